// Adversarial tests for the two surfaces hostile-peer-test leaves alone: the CONNECT tunnel
// connector in front of a misbehaving proxy, and WebSocket handshakes (through StreamFetcher and
// ConnectionPool) against a misbehaving server. Real loopback TCP peers, driven by the test.
// Each test checks that the caller gets either a working tunnel / WebSocket or an error that says
// what the peer did, that a connection is never reused when it must not be, that no connection
// slot leaks, that retries happen only where DESIGN.md allows them, and that nothing hangs (every
// wait is bounded).

#include "connector.h"
#include "pool.h"
#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>

namespace sockfetch {
namespace {

using test::contains;
using test::noDelay;
using test::Peer;
using test::resetConnection;
using test::trickle;

constexpr kj::StringPtr TARGET = "origin.test:8080"_kj;
constexpr kj::StringPtr ESTABLISHED = "HTTP/1.1 200 Connection established\r\n\r\n"_kj;
constexpr kj::StringPtr OK_HELLO = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"_kj;
constexpr kj::StringPtr POISON = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"_kj;

kj::String okPath(kj::StringPtr path) {
  // A 200 whose body is the request's path, so that a misattributed response shows.
  return kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", path.size(), "\r\n\r\n", path);
}

kj::String frame(kj::byte opcode, kj::StringPtr payload) {
  // A final, unmasked WebSocket frame (server to client) with a payload under 126 bytes.
  KJ_ASSERT(payload.size() < 126);
  return kj::str(char(0x80 | opcode), char(payload.size()), payload);
}

constexpr kj::byte TEXT = 0x1;

kj::String acceptFor(kj::StringPtr head) {
  // The right Sec-WebSocket-Accept for the handshake request `head`.
  auto start = strstr(head.cStr(), "Sec-WebSocket-Key: ");
  KJ_ASSERT(start != nullptr, head);
  start += strlen("Sec-WebSocket-Key: ");
  return test::webSocketAccept(kj::heapString(start, strchr(start, '\r') - start));
}

kj::String switching(kj::StringPtr accept, kj::StringPtr upgrade = "websocket") {
  return kj::str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: ", upgrade,
      "\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ", accept, "\r\n\r\n");
}

kj::StringPtr textOf(kj::WebSocket::Message& message) {
  KJ_IF_SOME(text, message.tryGet<kj::String>()) {
    return text;
  }
  KJ_FAIL_ASSERT("expected a text message");
}

struct Env: public test::LoopEnv {
  // A listening loopback socket that plays the proxy (or, for the WebSocket tests, the server),
  // each of its connections driven by the test as a Peer; a pool in front of it, through a
  // CONNECT tunnel or directly. Members in dependency order.
  kj::Own<kj::ConnectionReceiver> listener;
  kj::Own<kj::NetworkAddress> address;
  kj::Own<ConnectionPool> pool;

  Env() {
    host = "origin.test";
    auto& network = io.provider->getNetwork();
    listener = network.parseAddress("127.0.0.1", 0).wait(ws)->listen();
    address = network.parseAddress("127.0.0.1", listener->getPort()).wait(ws);
  }

  void tunnelPool(ConnectionPool::Settings settings = {}) {
    pool = kj::heap<ConnectionPool>(timer, table,
        tunnelConnector(addressConnector(*address), TARGET), kj::mv(settings));
  }

  void directPool(ConnectionPool::Settings settings = {}) {
    pool = kj::heap<ConnectionPool>(timer, table, addressConnector(*address), kj::mv(settings));
  }

  kj::Own<Peer> accept() {
    return kj::heap<Peer>(ws, bounded(listener->accept()));
  }

  kj::Own<Peer> acceptConnect() {
    // The proxy's side of the next connection, its CONNECT request read.
    auto peer = accept();
    auto head = peer->readHead();
    KJ_EXPECT(head.startsWith(kj::str("CONNECT ", TARGET, " HTTP/1.1\r\n")), head);
    return peer;
  }

  bool acceptsWithin(kj::Duration d) {
    // Whether another connection arrives within `d` (it is then closed).
    return listener->accept().then([](kj::Own<kj::AsyncIoStream>) { return true; })
        .exclusiveJoin(timer.afterDelay(d).then([]() { return false; })).wait(ws);
  }

  kj::Promise<kj::String> get(kj::StringPtr url) {
    // A GET through the pool, its body read to the end. Eager: it connects while the test plays
    // the peer.
    auto request = pool->request(kj::HttpMethod::GET, url, headers());
    request.body = nullptr;
    return request.response.then([](kj::HttpClient::Response&& response) {
      return response.body->readAllText().attach(kj::mv(response.body));
    }).eagerlyEvaluate(nullptr);
  }

  void expectReusableTunnel(kj::StringPtr answer) {
    // Through a tunnel the proxy opens with `answer` (one write), two GETs, the second reusing the
    // connection.
    tunnelPool();
    auto first = get("/a");
    auto proxy = acceptConnect();
    proxy->send(answer);
    KJ_EXPECT(serve(*proxy, kj::mv(first), "/a") == "/a");
    KJ_EXPECT(serve(*proxy, get("/b"), "/b") == "/b");
    KJ_EXPECT(pool->getStats().reuses == 1, pool->getStats().reuses);
  }

  kj::String serve(Peer& peer, kj::Promise<kj::String> response, kj::StringPtr path) {
    // Plays the origin at the far end of a tunnel: expects the GET for `path`, answers it, and
    // returns what the caller got. If no request comes, says why the pool gave up instead.
    kj::String request;
    KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { request = peer.readRequest(); })) {
      auto why = failureOf(kj::mv(response));
      KJ_FAIL_ASSERT("no request came through the tunnel", why, e);
    }
    KJ_EXPECT(request.startsWith(kj::str("GET ", path, " HTTP/1.1\r\n")), request);
    peer.send(okPath(path));
    return bounded(kj::mv(response));
  }
};

struct FetcherEnv: public test::LoopEnv {
  // One loopback TCP connection, a StreamFetcher on the client end and a scripted peer on the
  // other.
  kj::Own<StreamFetcher> fetcher;
  kj::Own<Peer> peer;

  FetcherEnv() {
    host = "origin.test";
    auto transport = test::tcpTransport(io);
    StreamFetcher::Settings settings;
    settings.timer = timer;
    fetcher = kj::heap<StreamFetcher>(kj::mv(transport.client), table, kj::mv(settings));
    peer = kj::heap<Peer>(ws, kj::mv(transport.server));
  }

  kj::Promise<kj::HttpClient::WebSocketResponse> openWebSocket() {
    return fetcher->openWebSocket("/ws", headers()).eagerlyEvaluate(nullptr);
  }

  kj::StringPtr reason() {
    KJ_IF_SOME(r, fetcher->getCloseReason()) return r;
    return "(not closed)";
  }

  kj::String get(kj::StringPtr response) {
    // A GET answered by `response` (one write), its body read to the end.
    auto req = fetcher->request(kj::HttpMethod::GET, "/", headers());
    req.body = nullptr;
    peer->readRequest();
    auto sent = peer->sendLater(response);
    auto r = bounded(kj::mv(req.response));
    auto body = bounded(r.body->readAllText());
    bounded(kj::mv(sent));
    return body;
  }

  void expectNextRequestRefused() {
    // The connection is gone: a new request fails at once with a clear reason, writing nothing.
    KJ_EXPECT(fetcher->getState() == StreamFetcher::State::CLOSED, fetcher->getState());
    KJ_EXPECT_THROW(DISCONNECTED, fetcher->request(kj::HttpMethod::GET, "/", headers()));
  }

  bool drainsToEnd() { return LoopEnv::drainsToEnd(*peer); }
};

// =================================================================================================
// The CONNECT tunnel connector, through a ConnectionPool, against a misbehaving proxy

KJ_TEST("hostile proxy: a CONNECT answer trickled a byte at a time opens a reusable tunnel") {
  Env env;
  env.tunnelPool();
  auto first = env.get("/a");
  auto proxy = env.acceptConnect();
  noDelay(*proxy);
  env.bounded(trickle(proxy->getStream(), env.timer,
      "HTTP/1.1 200 Connection established\r\nProxy-Agent: slow\r\n\r\n"_kj));
  KJ_EXPECT(env.serve(*proxy, kj::mv(first), "/a") == "/a");
  KJ_EXPECT(env.serve(*proxy, env.get("/b"), "/b") == "/b");
  KJ_EXPECT(env.pool->getStats().reuses == 1, env.pool->getStats().reuses);
  KJ_EXPECT(env.pool->getStats().connectionsOpened == 1);
}

KJ_TEST("hostile proxy: an HTTP/1.0 200 opens the tunnel; the origin's own answers govern reuse") {
  // Many proxies answer CONNECT in HTTP/1.0. That says nothing about the origin's HTTP/1.1
  // connection inside the tunnel, which stays reusable.
  Env env;
  env.expectReusableTunnel("HTTP/1.0 200 Connection established\r\n\r\n");
}

KJ_TEST("hostile proxy: an answer whose lines end in a bare LF opens the tunnel") {
  // RFC 9112 2.2 lets a recipient take a lone LF as a line end (here for an interim answer too).
  Env env;
  env.expectReusableTunnel("HTTP/1.1 100 Wait\n\nHTTP/1.1 200 OK\nProxy-Agent: lf\n\n");
}

KJ_TEST("hostile proxy: Content-Length and Transfer-Encoding on a 200 to CONNECT are ignored") {
  // RFC 9110 9.3.6: a client MUST ignore them in a 2xx to CONNECT; the tunnel starts right after
  // the head. A connector that honoured them would wait for a body that never comes (or eat the
  // origin's response as one).
  Env env;
  env.tunnelPool();
  auto first = env.get("/a");
  auto proxy = env.acceptConnect();
  proxy->send("HTTP/1.1 200 OK\r\nContent-Length: 20\r\nTransfer-Encoding: chunked\r\n\r\n");
  KJ_EXPECT(env.serve(*proxy, kj::mv(first), "/a") == "/a");
  KJ_EXPECT(env.pool->getStats().connectFailures == 0);
}

KJ_TEST("hostile proxy: a 1xx before the 200 is skipped, as for any HTTP response") {
  // RFC 9110 15.2: a client MUST be able to parse one or more 1xx responses before the final
  // response, even if it does not expect one. The 200 is the proxy's answer; the 100 is not.
  Env env;
  env.tunnelPool();
  auto first = env.get("/a");
  auto proxy = env.acceptConnect();
  proxy->send(kj::str("HTTP/1.1 100 Continue\r\n\r\n", ESTABLISHED));
  KJ_EXPECT(env.serve(*proxy, kj::mv(first), "/a") == "/a");
}

KJ_TEST("hostile proxy: a refusal with a body fails with its status, closes, and is not retried") {
  // The refusal's body is shaped like a response: it must not become one. A refusal is the
  // proxy's decision, not a stale connection: no retry. The pool stays usable.
  Env env;
  env.tunnelPool();
  auto first = env.get("/a");
  auto proxy = env.acceptConnect();
  auto body = kj::str(okPath("/a"));
  proxy->send(kj::str("HTTP/1.1 407 Proxy Authentication Required\r\n"
      "Proxy-Authenticate: Basic realm=\"proxy\"\r\nContent-Length: ", body.size(), "\r\n\r\n",
      body));
  auto e = env.failureOf(kj::mv(first));
  KJ_EXPECT(contains(e.getDescription(), kj::str("the proxy asks for credentials to open a tunnel "
      "to ", TARGET, " (\"407 Proxy Authentication Required\"), and tunnelConnector sends none")),
      e);
  KJ_EXPECT(proxy->sawEof(), "the refused connection was not closed");
  KJ_EXPECT(!env.acceptsWithin(50 * kj::MILLISECONDS), "a refused CONNECT was retried");
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.connectFailures == 1);
  KJ_EXPECT(stats.retries == 0);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());

  auto second = env.get("/b");
  auto proxy2 = env.acceptConnect();
  proxy2->send(ESTABLISHED);
  KJ_EXPECT(env.serve(*proxy2, kj::mv(second), "/b") == "/b");
}

KJ_TEST("hostile proxy: refusals under maxConnections = 1 serve every waiter, leaking no slot") {
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  Env env;
  env.tunnelPool(kj::mv(settings));
  kj::Vector<kj::Promise<kj::String>> requests;
  for (int i = 0; i < 3; i++) requests.add(env.get(kj::str("/", i)));
  for (int i = 0; i < 3; i++) {
    auto proxy = env.acceptConnect();
    KJ_EXPECT(env.pool->getOpenCount() == 1, env.pool->getOpenCount());
    proxy->send("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
    auto e = env.failureOf(kj::mv(requests[i]));
    KJ_EXPECT(contains(e.getDescription(), "\"503 Service Unavailable\""), e);
  }
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.waits == 2, stats.waits);
  KJ_EXPECT(stats.connectFailures == 3, stats.connectFailures);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  KJ_EXPECT(env.pool->getWaitingCount() == 0);
}

KJ_TEST("hostile proxy: one that never answers times out, frees its slot, maxConnections holds") {
  ConnectionPool::Settings settings;
  settings.maxConnections = 2;
  settings.connectTimeout = 100 * kj::MILLISECONDS;
  Env env;
  env.tunnelPool(kj::mv(settings));
  auto a = env.get("/a");
  auto b = env.get("/b");
  auto c = env.get("/c");
  auto proxyA = env.acceptConnect();
  auto proxyB = env.acceptConnect();
  KJ_EXPECT(env.pool->getOpenCount() == 2, env.pool->getOpenCount());
  KJ_EXPECT(env.pool->getWaitingCount() == 1, env.pool->getWaitingCount());

  for (auto promise: {&a, &b}) {
    auto e = env.failureOf(kj::mv(*promise));
    KJ_EXPECT(e.getType() == kj::Exception::Type::OVERLOADED, e);
    KJ_EXPECT(contains(e.getDescription(), "timed out after 100 ms"), e);
  }
  // The freed slot goes to the waiting request, which gets no answer either.
  auto proxyC = env.acceptConnect();
  KJ_EXPECT(proxyA->sawEof(), "a timed-out tunnel was left open");
  KJ_EXPECT(proxyB->sawEof(), "a timed-out tunnel was left open");
  auto e = env.failureOf(kj::mv(c));
  KJ_EXPECT(contains(e.getDescription(), "timed out after 100 ms"), e);
  KJ_EXPECT(proxyC->sawEof(), "a timed-out tunnel was left open");
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.connectFailures == 3, stats.connectFailures);
  KJ_EXPECT(stats.connectionsOpened == 0);
  KJ_EXPECT(stats.retries == 0);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  KJ_EXPECT(!env.acceptsWithin(50 * kj::MILLISECONDS), "a timed-out CONNECT was retried");
}

KJ_TEST("hostile proxy: one that closes in the middle of its answer fails the request clearly") {
  Env env;
  env.tunnelPool();
  auto first = env.get("/a");
  auto proxy = env.acceptConnect();
  proxy->send("HTTP/1.1 200 Connection est");
  proxy->close();
  auto e = env.failureOf(kj::mv(first));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(),
      kj::str("the proxy closed the connection before answering CONNECT ", TARGET)), e);
  KJ_EXPECT(!env.acceptsWithin(50 * kj::MILLISECONDS), "a failed CONNECT was retried");
  KJ_EXPECT(env.pool->getStats().connectFailures == 1);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
}

KJ_TEST("hostile proxy: one that resets in the middle of its answer fails naming the CONNECT") {
  // A reset is the same event as a close (the proxy went away before answering), so the error
  // should say so as the close's does: a bare "connection reset" in a pool's error cannot be told
  // from the origin resetting a request.
  Env env;
  env.tunnelPool();
  auto first = env.get("/a");
  auto proxy = env.acceptConnect();
  proxy->send("HTTP/1.1 200 Connection est");
  env.settle(5 * kj::MILLISECONDS);
  resetConnection(*proxy);
  auto e = env.failureOf(kj::mv(first));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), "CONNECT"), e);
  KJ_EXPECT(!env.acceptsWithin(50 * kj::MILLISECONDS), "a failed CONNECT was retried");
  KJ_EXPECT(env.pool->getStats().connectFailures == 1);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
}

KJ_TEST("hostile proxy: an endless answer head is cut off at the connector's limit") {
  Env env;
  env.tunnelPool();
  auto first = env.get("/a");
  auto proxy = env.acceptConnect();
  kj::Vector<char> head;
  head.addAll("HTTP/1.1 200 OK\r\n"_kj);
  while (head.size() < 256 * 1024) head.addAll("X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"_kj);
  head.add('\0');
  kj::StringPtr text(head.begin(), head.size() - 1);
  // The client stops reading and closes, so this write may fail: that is fine.
  auto write = proxy->sendLater(text).then([]() {}, [](kj::Exception&&) {});
  auto e = env.failureOf(kj::mv(first));
  KJ_EXPECT(contains(e.getDescription(), "is longer than 16384 bytes"), e);
  env.bounded(kj::mv(write));
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  KJ_EXPECT(!env.acceptsWithin(50 * kj::MILLISECONDS), "a failed CONNECT was retried");
}

KJ_TEST("hostile proxy: an answer that is not HTTP fails, naming what came") {
  for (auto answer: {"SSH-2.0-OpenSSH_9.2p1 Debian-2"_kj, "HTTP/2 200"_kj,
                     "HTTP/1.1 2xx Tunnel"_kj, "HTTP/1.1 2 OK"_kj}) {
    // "2xx" and "2": RFC 9112 4: status-code = 3DIGIT. A status line that only starts like a 2xx
    // is not a 2xx, and the tunnel must not open on it.
    KJ_CONTEXT(answer);
    Env env;
    env.tunnelPool();
    auto first = env.get("/a");
    auto proxy = env.acceptConnect();
    proxy->send(kj::str(answer, "\r\n\r\n"));
    // The client must close without writing anything more (a request would show here first).
    KJ_EXPECT(proxy->sawEof(), "a request was sent through a tunnel that never opened");
    proxy->close();  // if the tunnel was taken as open, its request fails now rather than hang
    auto e = env.failureOf(kj::mv(first));
    KJ_EXPECT(contains(e.getDescription(), kj::str("something that is not HTTP (", answer, ")")),
        e.getDescription());
    KJ_EXPECT(env.pool->getStats().connectFailures == 1);
  }
}

KJ_TEST("hostile proxy: an answer that begins with an empty line fails, saying so") {
  Env env;
  env.tunnelPool();
  auto first = env.get("/a");
  auto proxy = env.acceptConnect();
  proxy->send("\r\nHTTP/1.1 200 Connection Established\r\n\r\n");
  KJ_EXPECT(proxy->sawEof(), "a request was sent through a tunnel that never opened");
  auto e = env.failureOf(kj::mv(first));
  KJ_EXPECT(contains(e.getDescription(), "something that is not HTTP (an empty line where its "
      "status line belongs)"), e.getDescription());
}

KJ_TEST("hostile proxy: a tunnel closed right after its 200 is never written to, retried once") {
  // The tunnel is gone before the request is written: DESIGN.md lets a request that never
  // reached a connection be retried, once, whatever it is; the retry meets the same proxy.
  Env env;
  env.tunnelPool();
  auto first = env.get("/a");
  auto proxy = env.acceptConnect();
  proxy->send(ESTABLISHED);
  proxy->getStream().shutdownWrite();
  auto proxy2 = env.acceptConnect();
  proxy2->send(ESTABLISHED);
  proxy2->getStream().shutdownWrite();
  auto e = env.failureOf(kj::mv(first));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), "closed"), e);
  KJ_EXPECT(proxy->sawEof(), "a request was written into a closed tunnel");
  KJ_EXPECT(proxy2->sawEof(), "a request was written into a closed tunnel");
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.retries == 1, stats.retries);
  // (Both tunnels were new: closed before their first request.)
  KJ_EXPECT(stats.droppedPeerClosedNew == 2, stats.droppedPeerClosedNew);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  KJ_EXPECT(!env.acceptsWithin(50 * kj::MILLISECONDS), "a request was tried a third time");
}

KJ_TEST("hostile proxy: a reused tunnel lost as a GET goes out is retried on a new CONNECT") {
  // The stale keep-alive race, through a proxy: the GET is retried once on a new tunnel; when the
  // proxy then refuses that tunnel, the caller hears the refusal, not the stale connection.
  Env env;
  env.tunnelPool();
  auto first = env.get("/a");
  auto proxy = env.acceptConnect();
  proxy->send(ESTABLISHED);
  KJ_EXPECT(env.serve(*proxy, kj::mv(first), "/a") == "/a");
  auto second = env.get("/b");
  KJ_EXPECT(proxy->readRequest().startsWith("GET /b HTTP/1.1\r\n"));
  proxy->close();
  auto proxy2 = env.acceptConnect();
  proxy2->send("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
  auto e = env.failureOf(kj::mv(second));
  KJ_EXPECT(contains(e.getDescription(),
      kj::str("refused to open a tunnel to ", TARGET, ": \"403 Forbidden\"")), e);
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.retries == 1, stats.retries);
  KJ_EXPECT(stats.droppedStale == 1, stats.droppedStale);
  KJ_EXPECT(stats.connectFailures == 1, stats.connectFailures);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  KJ_EXPECT(!env.acceptsWithin(50 * kj::MILLISECONDS), "a request was tried a third time");
}

KJ_TEST("hostile proxy: bytes the far end sends later, before any request, poison the tunnel") {
  // A StreamFetcher over a tunnel that opened cleanly: what arrives while it is idle was not
  // asked for, and must never become the next request's response.
  Env env;
  auto connector = tunnelConnector(addressConnector(*env.address), TARGET);
  auto tunnel = connector().eagerlyEvaluate(nullptr);
  auto proxy = env.acceptConnect();
  proxy->send(ESTABLISHED);
  StreamFetcher::Settings settings;
  settings.timer = env.timer;
  StreamFetcher fetcher(env.bounded(kj::mv(tunnel)), env.table, kj::mv(settings));
  env.settle();
  KJ_EXPECT(fetcher.getState() == StreamFetcher::State::IDLE);
  proxy->send(POISON);
  env.waitFor([&]() { return fetcher.getState() == StreamFetcher::State::CLOSED; });
  KJ_EXPECT(fetcher.getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES,
      fetcher.getCloseKind(), fetcher.getCloseReason().orDefault("(not closed)"));
  KJ_EXPECT_THROW(DISCONNECTED, fetcher.request(kj::HttpMethod::GET, "/", env.headers()));
  KJ_EXPECT(proxy->sawEof(), "a request was written into a poisoned tunnel");
}

KJ_TEST("hostile proxy: a body after the 200 to CONNECT is tunnel data, never a response") {
  // The proxy sends a Content-Length body with its 200. RFC 9110 9.3.6 says the client ignores
  // that header, so the body is the first bytes of the tunnel, which nobody asked for: on a
  // StreamFetcher the tunnel is poisoned before a request is written.
  Env env;
  auto connector = tunnelConnector(addressConnector(*env.address), TARGET);
  auto tunnel = connector().eagerlyEvaluate(nullptr);
  auto proxy = env.acceptConnect();
  proxy->send(kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", POISON.size(), "\r\n\r\n", POISON));
  StreamFetcher::Settings settings;
  settings.timer = env.timer;
  StreamFetcher fetcher(env.bounded(kj::mv(tunnel)), env.table, kj::mv(settings));
  env.waitFor([&]() { return fetcher.getState() == StreamFetcher::State::CLOSED; });
  KJ_EXPECT(fetcher.getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES,
      fetcher.getCloseKind(), fetcher.getCloseReason().orDefault("(not closed)"));
  KJ_EXPECT_THROW(DISCONNECTED, fetcher.request(kj::HttpMethod::GET, "/", env.headers()));
  KJ_EXPECT(proxy->sawEof(), "a request was written into a poisoned tunnel");
}

KJ_TEST("hostile proxy: a WebSocket through a tunnel gets the frame sent with the 101") {
  Env env;
  env.tunnelPool();
  auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  auto proxy = env.acceptConnect();
  proxy->send(ESTABLISHED);
  auto head = proxy->readHead();
  KJ_EXPECT(head.startsWith("GET /ws HTTP/1.1\r\n"), head);
  proxy->send(kj::str(switching(acceptFor(head)), frame(TEXT, "through")));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101, response.statusCode);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto message = env.bounded(socket.receive());
  KJ_EXPECT(textOf(message) == "through");
  KJ_EXPECT(env.pool->getStats().droppedUpgraded == 1);
}

// =================================================================================================
// WebSocket handshakes through a StreamFetcher against a misbehaving server

KJ_TEST("hostile WebSocket server: a wrong Sec-WebSocket-Accept fails, and ends the connection") {
  FetcherEnv env;
  auto handshake = env.openWebSocket();
  env.peer->readHead();
  auto sent = env.peer->sendLater(kj::str(switching(test::webSocketAccept("some other key")),
      frame(TEXT, "hi")));
  auto e = env.failureOf(kj::mv(handshake));
  KJ_EXPECT(contains(e.getDescription(), "Sec-WebSocket-Accept"), e);
  env.bounded(kj::mv(sent));
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::FAILED,
      env.fetcher->getCloseKind(), env.reason());
  env.expectNextRequestRefused();
  KJ_EXPECT(env.drainsToEnd(), "the failed handshake's connection was not closed");
}

KJ_TEST("hostile WebSocket server: a 101 to another protocol than asked fails the handshake") {
  for (auto upgrade: {"h2c"_kj, ""_kj}) {
    KJ_CONTEXT(upgrade);
    FetcherEnv env;
    auto handshake = env.openWebSocket();
    auto head = env.peer->readHead();
    auto answer = upgrade.size() > 0 ? switching(acceptFor(head), upgrade)
        : kj::str("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
              "Sec-WebSocket-Accept: ", acceptFor(head), "\r\n\r\n");
    auto sent = env.peer->sendLater(answer);
    auto e = env.failureOf(kj::mv(handshake));
    KJ_EXPECT(contains(e.getDescription(), "Upgrade"), e);
    env.bounded(kj::mv(sent));
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED, env.reason());
    env.expectNextRequestRefused();
    KJ_EXPECT(env.drainsToEnd(), "the failed handshake's connection was not closed");
  }
}

KJ_TEST("hostile WebSocket server: interim 100 and 103 before the 101 are skipped") {
  FetcherEnv env;
  auto handshake = env.openWebSocket();
  auto head = env.peer->readHead();
  auto sent = env.peer->sendLater(kj::str("HTTP/1.1 100 Continue\r\n\r\n"
      "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
      switching(acceptFor(head)), frame(TEXT, "after interim")));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101, response.statusCode);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto message = env.bounded(socket.receive());
  KJ_EXPECT(textOf(message) == "after interim");
  env.bounded(kj::mv(sent));
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UPGRADED,
      env.fetcher->getCloseKind(), env.reason());
}

KJ_TEST("hostile WebSocket server: a 101 and frames trickled a byte at a time all arrive") {
  FetcherEnv env;
  noDelay(*env.peer);
  auto handshake = env.openWebSocket();
  auto head = env.peer->readHead();
  auto bytes = kj::str(switching(acceptFor(head)), frame(TEXT, "one"), frame(TEXT, "two"));
  auto sending = trickle(env.peer->getStream(), env.timer, bytes).eagerlyEvaluate(nullptr);
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101, response.statusCode);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto one = env.bounded(socket.receive());
  KJ_EXPECT(textOf(one) == "one");
  auto two = env.bounded(socket.receive());
  KJ_EXPECT(textOf(two) == "two");
  env.bounded(kj::mv(sending));
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UPGRADED,
      env.fetcher->getCloseKind(), env.reason());
}

KJ_TEST("hostile WebSocket server: a 101 then an immediate close ends the WebSocket, no hang") {
  FetcherEnv env;
  auto handshake = env.openWebSocket();
  auto head = env.peer->readHead();
  env.peer->send(switching(acceptFor(head)));
  env.peer->close();
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101, response.statusCode);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto e = env.failureOf(socket.receive());
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UPGRADED,
      env.fetcher->getCloseKind(), env.reason());
  env.expectNextRequestRefused();
}

KJ_TEST("hostile WebSocket server: a refused handshake keeps the connection only if clean") {
  // A non-101 answer is an ordinary response (stream-fetcher.h): the connection comes back only
  // when that response was cleanly framed and allowed keep-alive, and nothing followed it.
  struct Case {
    kj::StringPtr answer;
    bool closeAfter;
    StreamFetcher::CloseKind kind;  // NONE: the connection is reused
  };
  using Kind = StreamFetcher::CloseKind;
  Case cases[] = {
    {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\nX-T: 1\r\n\r\n"_kj,
        false, Kind::NONE},
    {"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"_kj,
        false, Kind::NONE},
    {"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nnoHTTP/1.1 200 OK\r\n"
        "Content-Length: 6\r\n\r\nPOISON"_kj, false, Kind::UNSOLICITED_BYTES},
    {"HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno"_kj,
        false, Kind::CONNECTION_CLOSE},
    {"HTTP/1.0 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"_kj, false, Kind::NOT_REUSABLE},
    {"HTTP/1.1 403 Forbidden\r\n\r\nno"_kj, true, Kind::NOT_REUSABLE},
  };
  for (auto& c: cases) {
    KJ_CONTEXT(c.answer);
    FetcherEnv env;
    auto handshake = env.openWebSocket();
    env.peer->readHead();
    env.peer->send(c.answer);
    if (c.closeAfter) env.peer->getStream().shutdownWrite();
    auto response = env.bounded(kj::mv(handshake));
    KJ_EXPECT(response.statusCode != 101);
    auto& body = *KJ_ASSERT_NONNULL(
        response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>());
    KJ_EXPECT(env.bounded(body.readAllText()) == "no");
    if (c.kind == Kind::NONE) {
      KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE, env.reason());
      KJ_EXPECT(env.get(OK_HELLO) == "hello");
    } else {
      env.waitFor([&]() { return env.fetcher->getState() == StreamFetcher::State::CLOSED; });
      KJ_EXPECT(env.fetcher->getCloseKind() == c.kind, env.fetcher->getCloseKind(), env.reason());
      env.expectNextRequestRefused();
    }
  }
}

// =================================================================================================
// WebSocket handshakes through a ConnectionPool against a misbehaving server

KJ_TEST("hostile WebSocket pool upstream: frames behind the 101, one split, reach the WebSocket") {
  Env env;
  env.directPool();
  auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  auto server = env.accept();
  auto head = server->readHead();
  KJ_EXPECT(head.startsWith("GET /ws HTTP/1.1\r\n"), head);
  auto second = frame(TEXT, "second");
  server->send(kj::str(switching(acceptFor(head)), frame(TEXT, "first"),
      second.slice(0, 3)));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101, response.statusCode);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto first = env.bounded(socket.receive());
  KJ_EXPECT(textOf(first) == "first");
  server->send(second.slice(3));
  auto rest = env.bounded(socket.receive());
  KJ_EXPECT(textOf(rest) == "second");
  // The WebSocket owns the connection: its frame reaches the server (masked: 2 + 4 + 2 bytes).
  auto sending = socket.send("yo"_kj);
  KJ_EXPECT(server->readExactly(8).size() == 8);
  env.bounded(kj::mv(sending));

  // The upgraded connection left the pool for good (pool.h): not counted, never reused.
  KJ_EXPECT(env.pool->getStats().droppedUpgraded == 1);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  KJ_EXPECT(env.pool->getIdleCount() == 0);
  auto next = env.get("/next");
  auto server2 = env.accept();
  KJ_EXPECT(env.serve(*server2, kj::mv(next), "/next") == "/next");
  KJ_EXPECT(server->readWouldBlock(), "a request was written into the WebSocket's connection");
  KJ_EXPECT(env.pool->getStats().connectionsOpened == 2);
}

KJ_TEST("hostile WebSocket pool upstream: a wrong accept is not retried and frees the slot") {
  // A handshake that failed on a response is the server's answer, not a stale connection.
  Env env;
  env.directPool();
  auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  auto server = env.accept();
  server->readHead();
  server->send(kj::str(switching(test::webSocketAccept("some other key")), frame(TEXT, "hi")));
  auto e = env.failureOf(kj::mv(handshake));
  KJ_EXPECT(contains(e.getDescription(), "Sec-WebSocket-Accept"), e);
  KJ_EXPECT(server->sawEof(), "the failed handshake's connection was not closed");
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.retries == 0, stats.retries);
  KJ_EXPECT(stats.droppedFailed == 1, stats.droppedFailed);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  KJ_EXPECT(!env.acceptsWithin(50 * kj::MILLISECONDS), "the failed handshake was retried");
}

KJ_TEST("hostile WebSocket pool upstream: a 200 instead of 101 gives the connection back") {
  // A refused handshake with a cleanly framed (chunked) answer: the next request reuses it.
  Env env;
  env.directPool();
  auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  auto server = env.accept();
  server->readHead();
  server->send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n");
  auto response = env.bounded(kj::mv(handshake));
  KJ_EXPECT(response.statusCode == 200);
  {
    auto body = kj::mv(KJ_ASSERT_NONNULL(
        response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>()));
    KJ_EXPECT(env.bounded(body->readAllText()) == "nope");
  }
  KJ_EXPECT(env.pool->getIdleCount() == 1, env.pool->getIdleCount());
  KJ_EXPECT(env.serve(*server, env.get("/next"), "/next") == "/next");
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.reuses == 1, stats.reuses);
  KJ_EXPECT(stats.connectionsOpened == 1);
}

KJ_TEST("hostile WebSocket pool upstream: a 101 then a reset fails the WebSocket, not the pool") {
  Env env;
  env.directPool();
  auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  auto server = env.accept();
  auto head = server->readHead();
  server->send(switching(acceptFor(head)));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101, response.statusCode);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  resetConnection(*server);
  auto e = env.failureOf(socket.receive());
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  auto next = env.get("/next");
  auto server2 = env.accept();
  KJ_EXPECT(env.serve(*server2, kj::mv(next), "/next") == "/next");
  KJ_EXPECT(env.pool->getStats().droppedUpgraded == 1);
  KJ_EXPECT(env.pool->getStats().connectionsOpened == 2);
}

}  // namespace
}  // namespace sockfetch
