// A fresh-eyes review of ConnectionPool (pool.{h,c++}) and the connectors (connector.{h,c++}),
// each suspicion from reading the code proved or refuted with a scripted peer: real loopback TCP
// (127.0.0.1 and ::1) or in-process pipes on a hand-driven timer (pipe-pool-env.h).
//
// Covered here and nowhere else:
//  - the retry rule for every idempotent-but-unsafe and non-idempotent method the header names
//    (OPTIONS, TRACE, PUT, DELETE retried when the pool can replay their body; POST, PATCH and
//    an unlisted method never; a chunked body of unknown size never);
//  - a request arriving in the turn a cancelled connect frees its place, while another waits:
//    who gets the place;
//  - a connect that fails (a request's own, or one opened for a waiter) failing that request
//    only, the others waiting being served;
//  - what the errors say when the only connection is still being opened (OVERLOADED), when
//    a CONNECT tunnel's proxy cannot be reached at all, and when a connect times out;
//  - the address connector over IPv6 loopback.

#include "connector.h"
#include "pool.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/pipe-pool-env.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>

namespace sockfetch {
namespace {

using test::contains;
using test::ok;
using test::ScriptedServer;
using Reply = ScriptedServer::Reply;
using Response = kj::HttpClient::Response;

Reply silentClose() {
  // Reads the request and closes without a word: the stale keep-alive race, made deterministic.
  Reply reply;
  reply.closeAfter = true;
  return reply;
}

struct TcpEnv: public test::LoopEnv {
  // A scripted loopback upstream and a pool whose connector counts the sockets it holds.
  using Script = kj::Function<Reply(unsigned connection, unsigned request, kj::StringPtr text)>;
  Script script;
  kj::Vector<kj::String> seen;  // every request the server read (head and body), in order
  kj::Own<ScriptedServer> server;
  kj::Own<kj::NetworkAddress> address;
  unsigned liveStreams = 0;
  kj::Own<ConnectionPool> pool;

  explicit TcpEnv(Script s, ConnectionPool::Settings settings = {}): script(kj::mv(s)) {
    server = kj::heap<ScriptedServer>(io, "127.0.0.1",
        [this](unsigned connection, unsigned request, kj::StringPtr text) {
      seen.add(kj::str(text));
      return script(connection, request, text);
    });
    address = server->address();
    pool = kj::heap<ConnectionPool>(timer, table, [this]() {
      return address->connect().then([this](kj::Own<kj::AsyncIoStream>&& s) {
        ++liveStreams;
        return s.attach(kj::defer([this]() { --liveStreams; }));
      });
    }, kj::mv(settings));
  }

  kj::Promise<kj::String> send(kj::HttpMethod method, kj::StringPtr url,
      kj::Maybe<uint64_t> size, kj::StringPtr body) {
    // The response body, or "failed: " with the type and why.
    auto h = headers();
    auto request = pool->request(method, url, h, size);
    kj::Promise<void> write = kj::READY_NOW;
    if (body.size() > 0) {
      write = request.body->write(body.begin(), body.size()).attach(kj::mv(request.body));
    } else {
      request.body = nullptr;
    }
    return write.then([response = kj::mv(request.response)]() mutable {
      return kj::mv(response);
    }).then([](Response&& r) {
      return r.body->readAllText().attach(kj::mv(r.body));
    }, [](kj::Exception&& e) {
      return kj::str("failed: ", e.getType(), ": ", e.getDescription());
    });
  }

  void checkQuiescent() {
    settle();
    test::expectEveryConnectionCounted(ws, *pool, liveStreams);
  }
};

kj::Own<kj::NetworkAddress> refusingAddress(test::LoopEnv& env, kj::StringPtr host) {
  // An address on `host` where nothing listens (a port just bound, then let go).
  auto& network = env.io.provider->getNetwork();
  auto listener = network.parseAddress(host, 0).wait(env.ws)->listen();
  auto port = listener->getPort();
  listener = nullptr;
  return network.parseAddress(host, port).wait(env.ws);
}

// =================================================================================================
// The retry rule, method by method

KJ_TEST("pool review: on a reused connection the server closes as the request goes out, "
    "OPTIONS, TRACE, PUT and DELETE are sent once more when the pool holds their body; POST, "
    "PATCH, an unlisted method and a chunked body of unknown size never") {
  // pool.h: sent again when "its method is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE)
  // and the pool can replay its body (none, or one of known size up to maxReplayBodyBytes ...).
  // Never twice, and never a POST whose bytes reached the server." An unlisted method (PROPFIND)
  // is not taken for idempotent; a body of unknown size is sent chunked as it is written, so the
  // pool cannot replay it whatever the method.
  struct Case {
    kj::HttpMethod method;
    kj::Maybe<uint64_t> size;
    kj::StringPtr body;
    bool retried;
  };
  Case cases[] = {
    {kj::HttpMethod::OPTIONS, uint64_t(0), "", true},
    {kj::HttpMethod::TRACE, uint64_t(0), "", true},
    {kj::HttpMethod::PUT, uint64_t(0), "", true},
    {kj::HttpMethod::DELETE, uint64_t(0), "", true},
    {kj::HttpMethod::DELETE, uint64_t(3), "abc", true},
    {kj::HttpMethod::OPTIONS, uint64_t(3), "abc", true},
    {kj::HttpMethod::POST, uint64_t(0), "", false},
    {kj::HttpMethod::PATCH, uint64_t(3), "abc", false},
    {kj::HttpMethod::PROPFIND, uint64_t(0), "", false},
    {kj::HttpMethod::OPTIONS, nullptr, "", false},
    {kj::HttpMethod::DELETE, nullptr, "", false},
  };
  for (auto& c: cases) {
    KJ_CONTEXT(c.method, c.size != nullptr, c.body);
    TcpEnv env([](unsigned connection, unsigned request, kj::StringPtr) {
      if (connection == 0 && request == 1) return silentClose();
      return ok("fine");
    });
    KJ_ASSERT(env.bounded(env.send(kj::HttpMethod::GET, "/warm", nullptr, "")) == "fine");
    auto out = env.bounded(env.send(c.method, "/x", c.size, c.body));
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.droppedStale == 1, s.droppedStale);
    if (c.retried) {
      KJ_EXPECT(out == "fine", out);
      KJ_EXPECT(s.retries == 1, s.retries);
      KJ_ASSERT(env.seen.size() == 3, env.seen.size());
      KJ_EXPECT(env.seen[2] == env.seen[1], "the retry is not the request as first sent",
          env.seen[1], env.seen[2]);
      KJ_EXPECT(env.seen[1].endsWith(kj::str("\r\n\r\n", c.body)), env.seen[1]);
    } else {
      KJ_EXPECT(out.startsWith("failed: disconnected: "), out);
      KJ_EXPECT(contains(out, "retry on a new connection if the request is safe to repeat"), out);
      KJ_EXPECT(s.retries == 0, s.retries);
      KJ_EXPECT(env.seen.size() == 2, "sent again", env.seen.size());
    }
    env.checkQuiescent();
  }
}

// =================================================================================================
// Who gets a place freed by a cancelled connect

KJ_TEST("pool review: a place freed by a request giving up while its connection opens goes to "
    "the request already waiting, not to a WebSocket handshake made in the same turn") {
  // The queue is served oldest first, whoever asks next: here maxConnections is 1, A's connect
  // hangs, B waits for the place, A gives up, and in the same turn a WebSocket handshake is made
  // (openWebSocket() and a retry ask for a connection at once, where request() asks a turn
  // later). B takes the freed place and goes out first; the handshake waits behind it.
  test::PipePoolEnv env(test::limits(1));
  unsigned connects = 0;
  env.upstream.delayConnect = [&](kj::Promise<kj::Own<kj::AsyncIoStream>> p)
      -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    if (connects++ == 0) return kj::NEVER_DONE;  // A's connect never ends
    return kj::mv(p);
  };
  auto a = env.start("/a");
  env.turns();
  auto b = env.start("/b");
  env.turns();
  KJ_ASSERT(env.pool->getWaitingCount() == 1 && env.pool->getOpenCount() == 1,
      env.pool->getWaitingCount(), env.pool->getOpenCount());

  a = nullptr;  // A gives up while its connection is being opened
  kj::HttpHeaders headers(env.table);
  auto handshake = env.pool->openWebSocket("/ws", headers).eagerlyEvaluate(nullptr);
  env.turns();
  KJ_ASSERT(env.upstream.seen.size() >= 1, "nothing was sent at all");
  KJ_EXPECT(env.upstream.seen[0] == "1 /b", "a newcomer overtook the waiting request",
      env.upstream.seen[0], env.pool->getWaitingCount());

  // The handshake is answered once B's connection is given back.
  auto& s = env.pool->getStats();
  KJ_EXPECT(env.read(env.bounded(kj::mv(b))) == "1 /b");
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.webSocketOrBody.is<kj::Own<kj::AsyncInputStream>>());
  auto& body = response.webSocketOrBody.get<kj::Own<kj::AsyncInputStream>>();
  KJ_EXPECT(env.bounded(body->readAllText()) == "1 /ws");
  KJ_EXPECT(s.connectionsOpened == 1, s.connectionsOpened);
  env.checkCounted("after both");
}

KJ_TEST("pool review: a WebSocket handshake handed an idle connection in the turn the pool is "
    "destroyed fails as a waiting request does, and nothing is sent") {
  // pool.h: destroying the pool fails the requests that have not been sent and lets those sent
  // finish. A handshake takes an idle connection at once, but is sent a few turns later; the
  // pool is destroyed after k turns, for each k until the handshake went out first. Before its
  // connection reached it, the wait is cancelled; once it did, but before it was sent, the
  // handshake fails all the same, saying so. Either way nothing is sent, and the connection, no
  // longer the pool's, closes.
  bool sawHandedOver = false;
  for (unsigned k = 0; k < 20; k++) {
    KJ_CONTEXT(k);
    test::PipePoolEnv env(test::limits(1));
    KJ_ASSERT(env.get("/first") == "0 /first");
    KJ_ASSERT(env.pool->getIdleCount() == 1 && env.upstream.open == 1);
    auto handshake = env.takeIdle().then([](kj::HttpClient::WebSocketResponse&&) {
      return kj::Maybe<kj::Exception>(nullptr);
    }, [](kj::Exception&& e) { return kj::Maybe<kj::Exception>(kj::mv(e)); }).eagerlyEvaluate(
        nullptr);
    for (unsigned i = 0; i < k; i++) env.loop.run(1);
    bool sent = env.upstream.seen.size() > 1;
    env.pool = nullptr;
    auto outcome = env.bounded(kj::mv(handshake));
    env.turns();
    if (sent || env.upstream.seen.size() > 1) break;  // sent before the pool went: it may finish
    KJ_IF_SOME(failure, outcome) {
      KJ_EXPECT(failure.getType() == kj::Exception::Type::DISCONNECTED, failure);
      if (contains(failure.getDescription(), "before this WebSocket handshake could be sent")) {
        sawHandedOver = true;
        KJ_EXPECT(contains(failure.getDescription(), "keep the pool alive"), failure);
      } else {
        KJ_EXPECT(contains(failure.getDescription(), "while this request was waiting"), failure);
      }
    } else {
      KJ_FAIL_EXPECT("the handshake succeeded though nothing was sent");
    }
    KJ_EXPECT(env.upstream.open == 0, "the connection was left open");
  }
  KJ_EXPECT(sawHandedOver, "no k reached the turn between the hand-over and the send");
}

// =================================================================================================
// What the errors say

KJ_TEST("pool review: OVERLOADED while the only connection is still being opened says it is "
    "being opened, not busy") {
  // With maxConnections 1 and maxWaiting 0, a second request while the first one's connection
  // is still being opened (a slow accept, a far upstream, a CONNECT or TLS handshake) is refused
  // at once, rightly; the refusal says the connection is being opened, so that whoever reads it
  // looks at how long connecting takes rather than at busy connections.
  auto settings = test::limits(1);
  settings.maxWaiting = 0;
  test::PipePoolEnv env(kj::mv(settings));
  env.upstream.delayConnect = [](kj::Promise<kj::Own<kj::AsyncIoStream>>)
      -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    return kj::NEVER_DONE;  // the connect is still under way
  };
  auto a = env.start("/a");
  env.turns();
  KJ_ASSERT(env.pool->getOpenCount() == 1 && env.pool->getIdleCount() == 0);
  auto outcome = test::outcomeOf(env, env.start("/b"));
  KJ_EXPECT(outcome.startsWith("failed: the connection pool is saturated"), outcome);
  KJ_EXPECT(contains(outcome, "all 1 connections are busy or being opened (1 being opened)"),
      outcome);
  KJ_EXPECT(env.upstream.seen.size() == 0);
}

KJ_TEST("pool review: a CONNECT tunnel whose proxy refuses the TCP connection fails naming the "
    "proxy and the CONNECT, not as if the upstream were down") {
  // tunnelConnector(addressConnector(proxy), target) in a pool, the proxy not running: in a pool
  // "the upstream" is the origin the requests are for (origin.test:8080), so the error says that
  // the proxy (at its address) could not be reached for a tunnel to it, keeping kj's type.
  test::LoopEnv env;
  auto proxy = refusingAddress(env, "127.0.0.1");
  ConnectionPool pool(env.timer, env.table,
      tunnelConnector(addressConnector(*proxy), "origin.test:8080"));
  auto h = env.headers();
  auto request = pool.request(kj::HttpMethod::GET, "/", h);
  auto e = env.failureOf(kj::mv(request.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), proxy->toString()), e);  // it does name the address
  KJ_EXPECT(contains(e.getDescription(), "proxy"), "the proxy is not named as such", e);
  KJ_EXPECT(contains(e.getDescription(), "origin.test:8080"), "the CONNECT is not named", e);
  KJ_EXPECT(!contains(e.getDescription(), "upstream"), "blames the upstream", e);
  KJ_EXPECT(pool.getStats().connectFailures == 1 && pool.getOpenCount() == 0);
}

// =================================================================================================
// A failed connect fails its own request only

KJ_TEST("pool review: a connect that fails fails only the request it was opened for, whether its "
    "own or a waiter's; the others waiting are served, and every count adds up") {
  // maxConnections 1. Connect #0 (A's own) fails: A fails with the connector's error, and the
  // freed place goes to B, which waits, then C. Later, with D in flight and E, F waiting, D's
  // connection closes (Connection: close): the connect opened for E (#2) fails, E fails with it,
  // and F is served on connect #3.
  test::PipePoolEnv env(test::limits(1));
  auto& s = env.pool->getStats();
  unsigned index = 0;
  env.upstream.delayConnect = [&](kj::Promise<kj::Own<kj::AsyncIoStream>> p)
      -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    auto i = index++;
    return kj::evalLater([i, p = kj::mv(p)]() mutable -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      if (i == 0 || i == 2) {
        return KJ_EXCEPTION(DISCONNECTED, kj::str("test: connect #", i, " refused"));
      }
      return kj::mv(p);
    });
  };
  auto a = env.start("/a");
  auto b = env.start("/b");
  auto c = env.start("/c");
  env.turns();
  KJ_EXPECT(test::outcomeOf(env, kj::mv(a)) == "failed: test: connect #0 refused");
  KJ_EXPECT(test::outcomeOf(env, kj::mv(b)) == "1 /b");
  KJ_EXPECT(test::outcomeOf(env, kj::mv(c)) == "1 /c");
  KJ_EXPECT(s.connectFailures == 1 && s.connectionsOpened == 1, s.connectFailures,
      s.connectionsOpened);
  env.checkCounted("after A, B, C");

  auto d = env.start("/close-d");  // on connection 1, which then closes
  auto e = env.start("/e");
  auto f = env.start("/f");
  env.turns();
  KJ_EXPECT(test::outcomeOf(env, kj::mv(d)) == "1 /close-d");
  KJ_EXPECT(test::outcomeOf(env, kj::mv(e)) == "failed: test: connect #2 refused");
  KJ_EXPECT(test::outcomeOf(env, kj::mv(f)) == "3 /f");
  KJ_EXPECT(s.connectFailures == 2 && s.connectionsOpened == 2, s.connectFailures,
      s.connectionsOpened);
  KJ_EXPECT(s.droppedConnectionClose == 1, s.droppedConnectionClose);
  KJ_EXPECT(s.overloaded == 0, s.overloaded);
  env.checkCounted("after D, E, F");
}

// =================================================================================================
// IPv6 loopback

KJ_TEST("pool review: addressConnector over IPv6 loopback ([::1]): a pool serves and reuses one "
    "connection; a refusal names [::1]:port and what to check") {
  test::LoopEnv env;
  auto& network = env.io.provider->getNetwork();
  auto listener = network.parseAddress("[::1]", 0).wait(env.ws)->listen();
  auto address = network.parseAddress("[::1]", listener->getPort()).wait(env.ws);
  {
    ConnectionPool pool(env.timer, env.table, *address);
    auto serverSide = listener->accept();
    auto h = env.headers();
    auto first = pool.request(kj::HttpMethod::GET, "/one", h);
    first.body = nullptr;
    auto responseFirst = first.response.eagerlyEvaluate(nullptr);
    test::Peer peer(env.ws, env.bounded(kj::mv(serverSide)));
    for (auto path: {"/one"_kj, "/two"_kj}) {
      KJ_CONTEXT(path);
      kj::Promise<Response> response = nullptr;
      if (path == "/one") {
        response = kj::mv(responseFirst);
      } else {
        auto next = pool.request(kj::HttpMethod::GET, path, h);
        next.body = nullptr;
        response = next.response.eagerlyEvaluate(nullptr);
      }
      auto text = peer.readRequest();
      KJ_EXPECT(text.startsWith(kj::str("GET ", path, " HTTP/1.1\r\n")), text);
      peer.send(kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", path.size(), "\r\n\r\n", path));
      auto r = env.bounded(kj::mv(response));
      KJ_EXPECT(env.bounded(r.body->readAllText()) == path);
    }
    auto& s = pool.getStats();
    KJ_EXPECT(s.connectionsOpened == 1 && s.reuses == 1, s.connectionsOpened, s.reuses);
  }
  auto refusing = refusingAddress(env, "[::1]");
  ConnectionPool pool(env.timer, env.table, *refusing);
  auto h = env.headers();
  auto request = pool.request(kj::HttpMethod::GET, "/", h);
  auto e = env.failureOf(kj::mv(request.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), kj::str("connecting to ", refusing->toString())), e);
  KJ_EXPECT(contains(e.getDescription(), "[::1]:"), e);
  KJ_EXPECT(contains(e.getDescription(), "check that"), e);
  KJ_EXPECT(pool.getStats().connectFailures == 1 && pool.getOpenCount() == 0);
}

class NeverConnects final: public kj::NetworkAddress {
  // An address whose connect never ends (a host that drops SYNs), without leaving loopback.
public:
  kj::Promise<kj::Own<kj::AsyncIoStream>> connect() override { return kj::NEVER_DONE; }
  kj::Own<kj::ConnectionReceiver> listen() override { KJ_UNIMPLEMENTED("listen"); }
  kj::Own<kj::NetworkAddress> clone() override { return kj::heap<NeverConnects>(); }
  kj::String toString() override { return kj::str("127.0.0.1:9"); }
};

KJ_TEST("pool review: a connect that times out names the address it was opened to, when the "
    "pool was made with one") {
  test::LoopEnv env;
  NeverConnects address;
  ConnectionPool::Settings settings;
  settings.connectTimeout = 20 * kj::MILLISECONDS;
  ConnectionPool pool(env.timer, env.table, address, settings);
  auto h = env.headers();
  auto request = pool.request(kj::HttpMethod::GET, "/", h);
  auto e = env.failureOf(kj::mv(request.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::OVERLOADED, e);
  KJ_EXPECT(contains(e.getDescription(), "connecting to the upstream (127.0.0.1:9) timed out "
      "after 20 ms"), e);
  KJ_EXPECT(pool.getStats().connectFailures == 1 && pool.getOpenCount() == 0);
}

}  // namespace
}  // namespace sockfetch
