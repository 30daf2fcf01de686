// End to end: sockfetch deployed the way most users deploy it, as a reverse proxy. A kj::HttpServer
// listens on loopback TCP and serves kj::newHttpService(pool), where `pool` is a ConnectionPool to
// an upstream on loopback (TCP, or a unix socket). Downstream clients and upstream servers are raw
// sockets driven byte by byte by the test, so that each side can misbehave exactly: clients that
// disconnect mid-body, mid-response or while queued, pipeline, send `Expect: 100-continue`, ask
// for HEAD or a WebSocket; upstreams that send garbage after a response, close mid-body, send
// `Connection: close`, answer HTTP/1.0 or with 1xx first, answer 101 unasked, or hang.
//
// After each scenario: the next request through the proxy gets the right response (each response
// body names the request it answers, so a misattributed byte shows), the pool's statistics add up
// (connections opened = open + dropped, each drop under the right reason), an upstream connection
// that saw anything wrong is closed and never carries another request, and nothing hangs (every
// wait is bounded by LoopEnv::limit).
//
// Where an outcome is kj-http's own (kj::HttpServer's or newHttpService()'s, 0.9.2), the test says
// so: those are pinned as they are, not counted as sockfetch's.

#include "pool.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>
#include <sockfetch/wire.h>

#include <kj/compat/http.h>
#include <kj/debug.h>
#include <kj/test.h>
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

namespace sockfetch {
namespace {

using test::contains;

using test::headerOf;
using test::printable;
using test::within;
using test::Wire;

// =================================================================================================
// The proxy

kj::String bodyFor(kj::StringPtr path) {
  // The only right response body for `path`: it names the request it answers.
  return kj::str("response to ", path, " from the upstream");
}

kj::String okFor(kj::StringPtr path, kj::StringPtr extraHeaders = "") {
  auto body = bodyFor(path);
  return kj::str("HTTP/1.1 200 OK\r\n", extraHeaders, "Content-Length: ", body.size(), "\r\n\r\n",
      body);
}

kj::String chunkedOkFor(kj::StringPtr path) {
  auto body = bodyFor(path);
  return kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", kj::hex(body.size()),
      "\r\n", body, "\r\n0\r\n\r\n");
}

kj::String get(kj::StringPtr path, kj::StringPtr extraHeaders = "") {
  return kj::str("GET ", path, " HTTP/1.1\r\nHost: proxy.test\r\n", extraHeaders, "\r\n");
}

kj::String pattern(size_t size, unsigned seed) {
  // Bytes that depend on their position (and the seed), so that a lost, doubled or moved byte
  // shows.
  auto out = kj::heapString(size);
  for (size_t i = 0; i < size; i++) {
    out[i] = 'a' + (i * 7 + i / 4093 + seed) % 26;
  }
  return out;
}

kj::String chunked(kj::StringPtr data, size_t chunkSize, kj::StringPtr trailers = "") {
  kj::Vector<char> out;
  for (size_t i = 0; i < data.size(); i += chunkSize) {
    size_t n = kj::min(chunkSize, data.size() - i);
    out.addAll(kj::str(kj::hex(n), "\r\n"));
    out.addAll(data.slice(i, i + n));
    out.addAll(kj::StringPtr("\r\n"));
  }
  out.addAll(kj::str("0\r\n", trailers, "\r\n"));
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

class QuietEntropy final: public kj::EntropySource {
  // WebSocket keys and masks for the test's own downstream WebSocket client.
public:
  void generate(kj::ArrayPtr<kj::byte> buffer) override {
    for (auto& b: buffer) b = kj::byte(counter++ * 37 + 11);
  }

private:
  unsigned counter = 0;
};

ConnectionPool::Settings poolSettings(unsigned maxConnections = 4) {
  ConnectionPool::Settings settings;
  settings.maxConnections = maxConnections;
  return settings;
}

struct ProxyEnv: public test::LoopEnv {
  // The upstream (a listening socket whose connections the test accepts and drives), the pool to
  // it (whose connector counts the sockets it holds), and the proxy: kj::HttpServer on 127.0.0.1
  // serving kj::newHttpService(pool). Members in dependency order: the proxy goes first.
  kj::Maybe<kj::String> unixDirectory;
  kj::String unixPath;
  kj::Own<kj::ConnectionReceiver> upstreamListener;
  kj::Own<kj::NetworkAddress> upstreamAddress;
  unsigned connectsStarted = 0;
  unsigned liveStreams = 0;    // the pool's upstream sockets, connected and not yet destroyed
  unsigned upstreamAccepted = 0;
  kj::Vector<kj::Own<Wire>> strays;  // upstream connections the test did not expect
  kj::Own<ConnectionPool> pool;
  kj::Own<kj::HttpService> service;
  kj::Own<kj::HttpServer> server;
  kj::Own<kj::ConnectionReceiver> proxyListener;
  kj::Own<kj::NetworkAddress> proxyAddress;
  kj::Promise<void> serving = nullptr;

  explicit ProxyEnv(ConnectionPool::Settings settings = poolSettings(), bool unixUpstream = false) {
    auto& network = io.provider->getNetwork();
    if (unixUpstream) {
      // A directory of its own: tests may run in PID namespaces that share /tmp.
      char dir[] = "/tmp/sockfetch-proxy-XXXXXX";
      KJ_ASSERT(mkdtemp(dir) != nullptr, "making a directory for a unix socket failed", errno);
      unixDirectory = kj::heapString(dir);
      unixPath = kj::str(dir, "/upstream.sock");
      auto address = kj::str("unix:", unixPath);
      upstreamListener = network.parseAddress(address).wait(ws)->listen();
      upstreamAddress = network.parseAddress(address).wait(ws);
    } else {
      upstreamListener = network.parseAddress("127.0.0.1", 0).wait(ws)->listen();
      upstreamAddress =
          network.parseAddress("127.0.0.1", upstreamListener->getPort()).wait(ws);
    }
    pool = kj::heap<ConnectionPool>(timer, table, [this]() { return connect(); },
        kj::mv(settings));
    service = kj::newHttpService(*pool);
    startProxy();
  }

  ~ProxyEnv() noexcept(false) {
    KJ_IF_SOME(dir, unixDirectory) {
      unlink(unixPath.cStr());
      rmdir(dir.cStr());
    }
  }

  void startProxy() {
    auto& network = io.provider->getNetwork();
    server = kj::heap<kj::HttpServer>(timer, table, *service);
    proxyListener = network.parseAddress("127.0.0.1", 0).wait(ws)->listen();
    proxyAddress = network.parseAddress("127.0.0.1", proxyListener->getPort()).wait(ws);
    serving = server->listenHttp(*proxyListener).eagerlyEvaluate([](kj::Exception&& e) {
      KJ_LOG(ERROR, "the proxy's accept loop failed", e);
    });
  }

  void stopProxy() {
    // Destroys the HttpServer: every request it is handling is cancelled wherever it is.
    serving = nullptr;
    proxyAddress = nullptr;
    proxyListener = nullptr;
    server = nullptr;
  }

  kj::Promise<kj::Own<kj::AsyncIoStream>> connect() {
    ++connectsStarted;
    return upstreamAddress->connect().then([this](kj::Own<kj::AsyncIoStream>&& s) {
      ++liveStreams;
      return s.attach(kj::defer([this]() { --liveStreams; }));
    });
  }

  kj::Own<Wire> client() {
    auto stream = within(*this, proxyAddress->connect(), "connecting to the proxy");
    return kj::heap<Wire>(*this, kj::mv(stream), "downstream client");
  }

  kj::Own<Wire> acceptUpstream(kj::StringPtr what = "the proxy to open an upstream connection") {
    auto stream = within(*this, upstreamListener->accept(), what);
    ++upstreamAccepted;
    return kj::heap<Wire>(*this, kj::mv(stream), kj::str("upstream connection ",
        upstreamAccepted));
  }

  bool noNewUpstream(kj::Duration d = 50 * kj::MILLISECONDS) {
    // No new upstream connection is opened for `d`.
    auto accepted = upstreamListener->accept().then(
        [](kj::Own<kj::AsyncIoStream>&& s) -> kj::Maybe<kj::Own<kj::AsyncIoStream>> {
      return kj::mv(s);
    });
    auto outcome = accepted.exclusiveJoin(timer.afterDelay(d).then(
        []() -> kj::Maybe<kj::Own<kj::AsyncIoStream>> { return nullptr; })).wait(ws);
    KJ_IF_SOME(s, outcome) {
      strays.add(kj::heap<Wire>(*this, kj::mv(s), "unexpected upstream connection"));
      return false;
    }
    return true;
  }

  kj::String stats() {
    auto& s = pool->getStats();
    return kj::str("opened=", s.connectionsOpened, " connectFailures=", s.connectFailures,
        " requests=", s.requests, " reuses=", s.reuses, " retries=", s.retries, " waits=",
        s.waits, " overloaded=", s.overloaded, " | dropped=", s.dropped(), ": peerClosedIdle=",
        s.droppedPeerClosedIdle, " unsolicited=", s.droppedUnsolicitedBytes,
        " connectionClose=", s.droppedConnectionClose, " notReusable=", s.droppedNotReusable,
        " upgraded=", s.droppedUpgraded, " abandoned=", s.droppedAbandoned,
        " requestIncomplete=", s.droppedRequestIncomplete, " stale=", s.droppedStale,
        " failed=", s.droppedFailed, " idleTimeout=", s.droppedIdleTimeout, " idleLimit=",
        s.droppedIdleLimit, " maxRequests=", s.droppedMaxRequests, " neverReuse=",
        s.droppedNeverReuse, " forRetry=", s.droppedForRetry, " | open=", pool->getOpenCount(),
        " idle=", pool->getIdleCount(), " waiting=", pool->getWaitingCount(), " sockets=",
        liveStreams);
  }

  void expectAccounted() {
    // Nothing in flight: every connection opened is open (and idle) or was dropped, counted once.
    settle();
    test::expectEveryConnectionCounted(ws, *pool, liveStreams);
    KJ_EXPECT(strays.size() == 0, "the pool opened upstream connections the test did not expect",
        strays.size());
  }
};

kj::Own<Wire> roundTripNew(ProxyEnv& env, kj::StringPtr path) {
  // One GET through the proxy, on a new downstream connection, that the pool must send on a new
  // upstream connection (returned, idle and reusable afterwards): the response must be the right
  // one, byte for byte.
  auto down = env.client();
  down->send(get(path));
  auto up = env.acceptUpstream(kj::str("a new upstream connection for ", path));
  auto request = up->readRequest();
  KJ_EXPECT(request.method == "GET" && request.path == path, request.head);
  up->send(okFor(path));
  auto response = down->readResponse();
  KJ_EXPECT(response.status == 200, response.head);
  KJ_EXPECT(response.body.data == bodyFor(path), "the proxy answered with the wrong bytes",
      response.body.data);
  return up;
}

void roundTripOn(ProxyEnv& env, Wire& up, kj::StringPtr path) {
  // The same, on an upstream connection the pool must reuse.
  auto down = env.client();
  down->send(get(path));
  auto request = up.readRequest(kj::str("the request for ", path, " on the reused connection"));
  KJ_EXPECT(request.method == "GET" && request.path == path, request.head);
  up.send(okFor(path));
  auto response = down->readResponse();
  KJ_EXPECT(response.status == 200, response.head);
  KJ_EXPECT(response.body.data == bodyFor(path), "the proxy answered with the wrong bytes",
      response.body.data);
}

void expectClosedByPool(Wire& up, kj::StringPtr why) {
  // The pool closed this upstream connection (it saw something wrong) without sending on it.
  KJ_EXPECT(up.endsWithin(kj::str("the pool to close the connection: ", why)),
      "the pool sent more on a connection that must not be reused", why, up.leftover());
}

struct KjProxy {
  // The same proxy built on kj-http alone (kj::newHttpClient(timer, table, address) instead of a
  // ConnectionPool), to tell kj-http's own behaviour from sockfetch's. Runs on `env`'s loop, in
  // front of its own upstream listener.
  test::LoopEnv& env;
  kj::Own<kj::ConnectionReceiver> upstreamListener;
  kj::Own<kj::NetworkAddress> upstreamAddress;
  kj::Own<kj::HttpClient> client;
  kj::Own<kj::HttpService> service;
  kj::Own<kj::HttpServer> server;
  kj::Own<kj::ConnectionReceiver> proxyListener;
  kj::Own<kj::NetworkAddress> proxyAddress;
  kj::Promise<void> serving = nullptr;

  explicit KjProxy(test::LoopEnv& env): env(env) {
    auto& network = env.io.provider->getNetwork();
    upstreamListener = network.parseAddress("127.0.0.1", 0).wait(env.ws)->listen();
    upstreamAddress =
        network.parseAddress("127.0.0.1", upstreamListener->getPort()).wait(env.ws);
    client = kj::newHttpClient(env.timer, env.table, *upstreamAddress);
    service = kj::newHttpService(*client);
    server = kj::heap<kj::HttpServer>(env.timer, env.table, *service);
    proxyListener = network.parseAddress("127.0.0.1", 0).wait(env.ws)->listen();
    proxyAddress = network.parseAddress("127.0.0.1", proxyListener->getPort()).wait(env.ws);
    serving = server->listenHttp(*proxyListener).eagerlyEvaluate(nullptr);
  }

  kj::Own<Wire> connectClient() {
    return kj::heap<Wire>(env, within(env, proxyAddress->connect(), "connecting to kj's proxy"),
        "downstream client of kj's proxy");
  }
  kj::Own<Wire> acceptUpstream() {
    return kj::heap<Wire>(env, within(env, upstreamListener->accept(), "kj's proxy to connect"),
        "upstream of kj's proxy");
  }
};

// =================================================================================================
// The baseline

KJ_TEST("proxy: GETs and a POST pass through byte for byte; one upstream connection serves all") {
  ProxyEnv env;
  auto up = roundTripNew(env, "/one");
  roundTripOn(env, *up, "/two");

  // A POST with a body, then a second request on the same downstream connection.
  auto down = env.client();
  auto body = pattern(1000, 1);
  down->send(kj::str("POST /post HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: ", body.size(),
      "\r\nX-Custom: kept\r\n\r\n", body));
  auto request = up->readRequest();
  KJ_EXPECT(request.method == "POST" && request.path == "/post", request.head);
  KJ_EXPECT(request.body.data == body);
  KJ_EXPECT(headerOf(request.head, "X-Custom").orDefault(kj::str("(absent)")) == "kept",
      request.head);
  up->send(okFor("/post", "X-From-Upstream: yes\r\n"));
  auto response = down->readResponse("POST");
  KJ_EXPECT(response.status == 200 && response.body.data == bodyFor("/post"),
      response.body.data);
  KJ_EXPECT(headerOf(response.head, "X-From-Upstream").orDefault(kj::str("(absent)")) == "yes",
      response.head);
  down->send(get("/same-downstream"));
  request = up->readRequest();
  KJ_EXPECT(request.path == "/same-downstream", request.head);
  up->send(chunkedOkFor("/same-downstream"));
  response = down->readResponse();
  KJ_EXPECT(response.body.data == bodyFor("/same-downstream"), response.body.data);

  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.requests == 4 && s.reuses == 3 && s.dropped() == 0,
      env.stats());
}

KJ_TEST("proxy: six clients queued behind two connections each get their own response") {
  ProxyEnv env(poolSettings(2));
  kj::Vector<kj::Own<Wire>> clients;
  for (unsigned i = 0; i < 6; i++) {
    clients.add(env.client());
    clients.back()->send(get(kj::str("/client", i)));
    env.settle(2 * kj::MILLISECONDS);
  }
  auto upA = env.acceptUpstream();
  auto upB = env.acceptUpstream();
  KJ_EXPECT(env.pool->getWaitingCount() == 4, env.stats());
  for (unsigned i = 0; i < 6; i++) {
    // Answered alternately on each connection: each answer frees it for the next in the queue,
    // and the upstream never sees a second request before it answered the first.
    auto& up = i % 2 == 0 ? *upA : *upB;
    auto request = up.readRequest();
    KJ_EXPECT(up.quietFor(5 * kj::MILLISECONDS), "a request was pipelined", up.leftover());
    // Alternate the framings, so that each kind of end hands the connection on.
    up.send(i % 3 == 0 ? chunkedOkFor(request.path) : okFor(request.path));
  }
  for (unsigned i = 0; i < 6; i++) {
    auto response = clients[i]->readResponse();
    KJ_EXPECT(response.status == 200 &&
        response.body.data == bodyFor(kj::str("/client", i)),
        "a client got another client's response", i, response.body.data);
  }
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 2 && s.requests == 6 && s.reuses == 4 && s.waits == 4 &&
      s.dropped() == 0, env.stats());
}

// =================================================================================================
// Downstream clients that misbehave

KJ_TEST("downstream: a client that disconnects mid-body (Content-Length, buffered by the pool) "
        "sends nothing upstream; the idle connection stays good") {
  ProxyEnv env;
  auto up = roundTripNew(env, "/warm");
  for (bool reset: {true, false}) {
    // A crash (reset), and a client that closes its side (FIN) and waits.
    auto down = env.client();
    down->send(kj::str("PUT /upload HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 1000\r\n\r\n",
        pattern(300, 2)));
    env.settle();
    if (reset) {
      down->reset();
    } else {
      down->getStream().shutdownWrite();
      // kj::HttpServer closes the connection without an answer (the request failed as
      // DISCONNECTED): no 500 that would blame the server for the client's own cut.
      auto answer = down->readToEnd("the proxy to close the connection");
      KJ_EXPECT(answer.data.size() == 0, answer.data);
    }
    env.settle(30 * kj::MILLISECONDS);
    // The pool buffers a small body of known size before sending anything (so that it could
    // replay it): none of the cut request reached the upstream, on any connection.
    KJ_EXPECT(up->quietFor(30 * kj::MILLISECONDS), "bytes of a cut request reached the upstream",
        up->leftover());
    KJ_EXPECT(env.noNewUpstream());
  }
  env.expectAccounted();
  roundTripOn(env, *up, "/after");
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.requests == 4 && s.reuses == 1 && s.dropped() == 0,
      env.stats());
}

KJ_TEST("downstream: a client that disconnects mid-body (Content-Length, streamed) leaves the "
        "upstream a short body and a closed connection, counted as abandoned") {
  ProxyEnv env;
  for (bool reset: {true, false}) {
    auto down = env.client();
    size_t declared = 200000;  // beyond maxReplayBodyBytes: streamed as it comes
    down->send(kj::str("POST /upload HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: ", declared,
        "\r\n\r\n", pattern(5000, 3)));
    auto up = env.acceptUpstream();
    auto head = up->readHead("the streamed request's head");
    KJ_EXPECT(headerOf(head, "Content-Length").orDefault(kj::str("?")) == kj::str(declared),
        head);
    auto part = up->readFixed(5000, "the first part of the body");
    KJ_EXPECT(part.complete && part.data == pattern(5000, 3));
    if (reset) {
      down->reset();
    } else {
      down->getStream().shutdownWrite();
    }
    // The rest never comes: the pool closes the connection rather than leave the upstream
    // waiting for bytes that will not come.
    auto rest = up->readFixed(declared - 5000, "the upstream to see the request end");
    KJ_EXPECT(!rest.complete && rest.data.size() == 0, rest.data.size());
  }
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 2 && s.droppedAbandoned == 2 && s.dropped() == 2,
      env.stats());
  roundTripNew(env, "/after");
}

KJ_TEST("downstream: a client reset mid-body (chunked, streamed), before or after the response "
        "began: the upstream sees the connection end, never a last chunk") {
  for (bool responseBegan: {false, true}) {
    KJ_CONTEXT(responseBegan);
    ProxyEnv env;
    auto down = env.client();
    down->send("POST /upload HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n");
    auto up = env.acceptUpstream();
    up->readHead("the streamed request's head");
    KJ_EXPECT(up->tryReadThrough("5\r\nhello\r\n", "the first chunk") != nullptr);
    if (responseBegan) {
      up->send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n");
      KJ_EXPECT(down->readHead("the response head").startsWith("HTTP/1.1 200"));
    }
    down->reset();
    // kj::HttpServer cancels the exchange when its client goes; the pool must close the upstream
    // connection without finishing the body (a "0\r\n\r\n" here would pass a cut upload off as
    // complete).
    KJ_EXPECT(up->endsWithin("the upstream connection to be closed"),
        "the upstream saw more of the cut request", up->leftover());
    env.expectAccounted();
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.connectionsOpened == 1 && s.droppedAbandoned == 1 && s.dropped() == 1,
        env.stats());
    roundTripNew(env, "/after");
  }
}

KJ_TEST("kj-http, not sockfetch: a client that half-closes mid-chunked-upload has its cut body "
        "forwarded as complete (kj's own client does the same)") {
  // newHttpService() (kj-http 0.9.2) pumps the request body into the client's body stream and
  // then drops that stream whether the pump succeeded or failed; in kj's HttpClient API dropping
  // a chunked body stream is how it is finished. So when the downstream body ends early (the
  // client sent FIN mid-chunk-stream: "premature EOF" on kj::HttpServer's side) the upstream
  // receives the last chunk, and a cut upload looks complete. sockfetch sees exactly what kj's
  // own client sees (writes that all succeeded, then the drop), and behaves the same; it could
  // only tell by implementing tryPumpFrom() on its body streams. Pinned here so that a change on
  // either side shows.
  auto scenario = [](test::LoopEnv& env, Wire& down, kj::Function<kj::Own<Wire>()> accept) {
    down.send("POST /upload HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n");
    auto up = accept();
    up->readHead("the streamed request's head");
    KJ_EXPECT(up->tryReadThrough("5\r\nhello\r\n", "the first chunk") != nullptr);
    down.getStream().shutdownWrite();
    auto end = up->tryReadThrough("\r\n\r\n", "what follows the first chunk");
    KJ_EXPECT(end != nullptr && KJ_ASSERT_NONNULL(end) == "0\r\n\r\n",
        "kj-http no longer finishes a cut chunked upload: update this test", up->leftover());
    return up;
  };
  ProxyEnv env;
  {
    auto down = env.client();
    auto up = scenario(env, *down, [&]() { return env.acceptUpstream(); });
    // The upstream took it for a whole request and answers; the proxy has nobody to give the
    // answer to (its client is gone), but the connection is clean and the pool keeps it.
    up->send(okFor("/upload"));
    env.settle();
    env.expectAccounted();
    roundTripOn(env, *up, "/after");
  }
  KjProxy kjProxy(env);
  auto down = kjProxy.connectClient();
  scenario(env, *down, [&]() { return kjProxy.acceptUpstream(); });
}

KJ_TEST("downstream: a client that disconnects mid-response: the exchange is abandoned, the "
        "connection closed and never reused") {
  for (bool chunkedBody: {false, true}) {
    KJ_CONTEXT(chunkedBody);
    ProxyEnv env;
    auto down = env.client();
    down->send(get("/big"));
    auto up = env.acceptUpstream();
    up->readRequest();
    size_t size = 1 << 20;
    auto body = pattern(size, 4);
    if (chunkedBody) {
      up->send(kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
          kj::hex(size_t(1000)), "\r\n", body.slice(0, 1000), "\r\n"));
    } else {
      up->send(kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", size, "\r\n\r\n",
          body.slice(0, 1000)));
    }
    auto head = down->readHead("the response head");
    KJ_EXPECT(head.startsWith("HTTP/1.1 200"), head);
    down->reset();
    KJ_EXPECT(up->endsWithin("the pool to drop the abandoned exchange"), up->leftover());
    env.expectAccounted();
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.connectionsOpened == 1 && s.droppedAbandoned == 1 && s.dropped() == 1,
        env.stats());
    roundTripNew(env, "/after");
  }
}

KJ_TEST("downstream: a client that disconnects while queued for a connection leaves the queue; "
        "nothing is ever sent for it") {
  ProxyEnv env(poolSettings(1));
  auto downA = env.client();
  downA->send(get("/a"));
  auto up = env.acceptUpstream();
  auto requestA = up->readRequest();
  auto downB = env.client();
  downB->send(get("/b"));
  env.settle();
  KJ_EXPECT(env.pool->getWaitingCount() == 1, env.stats());
  downB->reset();
  env.settle(30 * kj::MILLISECONDS);
  // kj::HttpServer (0.9.2) cancels the request of a client that went; the pool lets it go.
  KJ_EXPECT(env.pool->getWaitingCount() == 0, env.stats());
  up->send(okFor("/a"));
  auto responseA = downA->readResponse();
  KJ_EXPECT(responseA.body.data == bodyFor("/a"), responseA.body.data);
  KJ_EXPECT(up->quietFor(50 * kj::MILLISECONDS), "a request whose client left was sent",
      up->leftover());
  env.expectAccounted();
  roundTripOn(env, *up, "/after");
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.requests == 3 && s.waits == 1 && s.reuses == 1 &&
      s.dropped() == 0, env.stats());
}

KJ_TEST("downstream: pipelined requests are answered in order, sent upstream one at a time on "
        "one connection") {
  ProxyEnv env;
  auto down = env.client();
  down->send(kj::str(get("/p1"), "POST /p2 HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 3\r\n"
      "\r\nabc", get("/p3")));
  auto up = env.acceptUpstream();
  for (auto path: {"/p1"_kj, "/p2"_kj, "/p3"_kj}) {
    auto request = up->readRequest();
    KJ_EXPECT(request.path == path, request.head);
    KJ_EXPECT(up->quietFor(20 * kj::MILLISECONDS), "the pool pipelined", up->leftover());
    up->send(okFor(path));
  }
  KJ_EXPECT(down->readResponse().body.data == bodyFor("/p1"));
  KJ_EXPECT(down->readResponse("POST").body.data == bodyFor("/p2"));
  KJ_EXPECT(down->readResponse().body.data == bodyFor("/p3"));
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.requests == 3 && s.reuses == 2 && s.dropped() == 0,
      env.stats());
}

KJ_TEST("downstream: pipelined requests behind a poisoned response: the next one goes on a new "
        "connection and gets its own answer") {
  ProxyEnv env;
  auto down = env.client();
  down->send(kj::str(get("/p1"), get("/p2")));
  auto up = env.acceptUpstream();
  up->readRequest();
  // The upstream answers /p2 before it was asked (it saw no second request): that answer must
  // never reach the client as /p2's.
  up->send(kj::str(okFor("/p1"), "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"));
  KJ_EXPECT(down->readResponse().body.data == bodyFor("/p1"));
  auto up2 = env.acceptUpstream("a new connection for the second pipelined request");
  auto request = up2->readRequest();
  KJ_EXPECT(request.path == "/p2", request.head);
  up2->send(okFor("/p2"));
  auto second = down->readResponse();
  KJ_EXPECT(second.body.data == bodyFor("/p2"), "a poisoned answer reached the client",
      second.body.data);
  expectClosedByPool(*up, "it sent an unsolicited response");
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 2 && s.droppedUnsolicitedBytes == 1 && s.dropped() == 1,
      env.stats());
}

KJ_TEST("downstream: Expect: 100-continue works once the client sends its body anyway; the "
        "upstream's 100 is skipped") {
  // kj::HttpServer (0.9.2) never sends `100 Continue` itself and HttpService::Response cannot
  // pass one on, so a client that waits for it waits for its own timeout (curl: 1 s) and then
  // sends the body: pinned below as kj-http's. sockfetch's part: it buffers a small body of known
  // size before sending anything (nothing reaches the upstream until then), streams a chunked
  // one at once, and in either case skips the upstream's interim answer.
  ProxyEnv env;
  kj::Own<Wire> up;
  for (bool streamed: {false, true}) {
    KJ_CONTEXT(streamed);
    auto down = env.client();
    auto path = streamed ? "/expect-streamed"_kj : "/expect-buffered"_kj;
    down->send(kj::str("POST ", path, " HTTP/1.1\r\nHost: proxy.test\r\n",
        streamed ? "Transfer-Encoding: chunked" : "Content-Length: 11",
        "\r\nExpect: 100-continue\r\n\r\n"));
    kj::String head;
    if (streamed) {
      head = up->readHead("the streamed request's head, sent at once");
      up->send("HTTP/1.1 100 Continue\r\n\r\n");
    } else {
      KJ_EXPECT(env.noNewUpstream(100 * kj::MILLISECONDS));
    }
    KJ_EXPECT(down->quietFor(100 * kj::MILLISECONDS),
        "the proxy answered an Expect itself now: update this test", down->leftover());
    down->send(streamed ? "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"_kj : "hello world"_kj);
    if (streamed) {
      auto body = up->readChunked("the body");
      KJ_EXPECT(body.complete && body.data == "hello world", body.data);
    } else {
      up = env.acceptUpstream();
      auto request = up->readRequest();
      head = kj::mv(request.head);
      KJ_EXPECT(request.body.data == "hello world", request.body.data);
      up->send("HTTP/1.1 100 Continue\r\n\r\n");
    }
    KJ_EXPECT(headerOf(head, "Expect").orDefault(kj::str("(absent)")) == "100-continue", head);
    up->send(okFor(path));
    auto response = down->readResponse("POST");
    KJ_EXPECT(response.status == 200 && response.body.data == bodyFor(path), response.head,
        response.body.data);
  }
  env.expectAccounted();
  roundTripOn(env, *up, "/after");
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.reuses == 2 && s.dropped() == 0, env.stats());
}

KJ_TEST("downstream: HEAD, 204 and 304 responses with Content-Length are bodiless end to end; "
        "both connections stay in step") {
  ProxyEnv env;
  auto down = env.client();
  down->send("HEAD /head HTTP/1.1\r\nHost: proxy.test\r\n\r\n");
  auto up = env.acceptUpstream();
  KJ_EXPECT(up->readRequest().method == "HEAD");
  up->send("HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX-Head: 1\r\n\r\n");
  auto head = down->readResponse("HEAD");
  KJ_EXPECT(head.status == 200, head.head);
  KJ_EXPECT(headerOf(head.head, "Content-Length").orDefault(kj::str("?")) == "1234", head.head);

  down->send(get("/no-content"));
  KJ_EXPECT(up->readRequest().path == "/no-content");
  up->send("HTTP/1.1 204 No Content\r\nContent-Length: 99\r\n\r\n");
  KJ_EXPECT(down->readResponse().status == 204);

  down->send(get("/not-modified", "If-None-Match: \"v1\"\r\n"));
  auto conditional = up->readRequest();
  KJ_EXPECT(headerOf(conditional.head, "If-None-Match").orDefault(kj::str("?")) == "\"v1\"");
  up->send("HTTP/1.1 304 Not Modified\r\nContent-Length: 77\r\nETag: \"v1\"\r\n\r\n");
  auto notModified = down->readResponse();
  KJ_EXPECT(notModified.status == 304 &&
      headerOf(notModified.head, "ETag").orDefault(kj::str("?")) == "\"v1\"", notModified.head);

  // Nothing was taken for a body on either side: the next exchange on both connections is right.
  KJ_EXPECT(down->quietFor(20 * kj::MILLISECONDS), down->leftover());
  down->send(get("/after"));
  KJ_EXPECT(up->readRequest().path == "/after");
  up->send(okFor("/after"));
  KJ_EXPECT(down->readResponse().body.data == bodyFor("/after"));
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.requests == 4 && s.reuses == 3 && s.dropped() == 0,
      env.stats());
}

KJ_TEST("downstream: a 1 MiB chunked upload and a 1 MiB chunked download pass byte for byte; "
        "the connection is reused") {
  ProxyEnv env;
  auto down = env.client();
  auto requestBody = pattern(1 << 20, 6);
  auto sending = down->sendLater(kj::str("POST /large HTTP/1.1\r\nHost: proxy.test\r\n"
      "Transfer-Encoding: chunked\r\n\r\n", chunked(requestBody, 16384)));
  auto up = env.acceptUpstream();
  auto request = up->readRequest();
  within(env, kj::mv(sending), "the client's upload");
  KJ_EXPECT(headerOf(request.head, "Transfer-Encoding").orDefault(kj::str("?")) == "chunked");
  KJ_EXPECT(request.body.complete && request.body.data == requestBody,
      "the upload was changed on its way", request.body.data.size());
  auto responseBody = pattern(1 << 20, 7);
  // With a trailer, which kj-http 0.9.2 does not parse (and so cannot pass on): sockfetch
  // consumes it so that the connection stays usable.
  auto answering = up->sendLater(kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
      chunked(responseBody, 65536, "X-Checksum: 1\r\n")));
  auto response = down->readResponse("POST");
  within(env, kj::mv(answering), "the upstream's answer");
  KJ_EXPECT(response.status == 200 && response.body.complete &&
      response.body.data == responseBody, "the download was changed on its way",
      response.body.data.size());
  roundTripOn(env, *up, "/after");
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.reuses == 1 && s.dropped() == 0, env.stats());
}

KJ_TEST("downstream: a bidirectional stream (the upstream echoes each chunk as it comes) ends "
        "clean and the connection is reused") {
  ProxyEnv env;
  auto down = env.client();
  down->send("POST /echo HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\n");
  auto up = env.acceptUpstream();
  up->readHead("the echo request's head");
  up->send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
  KJ_EXPECT(down->readHead("the echo response's head").startsWith("HTTP/1.1 200"));
  for (unsigned i = 0; i < 5; i++) {
    auto piece = kj::str("piece-", i);
    auto framed = kj::str(kj::hex(piece.size()), "\r\n", piece, "\r\n");
    down->send(framed);
    auto got = KJ_ASSERT_NONNULL(up->tryReadThrough(kj::str(piece, "\r\n"), "a request chunk"));
    KJ_EXPECT(got == framed, got);
    up->send(framed);
    auto echoed = KJ_ASSERT_NONNULL(down->tryReadThrough(kj::str(piece, "\r\n"), "an echo"));
    KJ_EXPECT(echoed == framed, echoed);
  }
  down->send("0\r\n\r\n");
  KJ_EXPECT(KJ_ASSERT_NONNULL(up->tryReadThrough("\r\n\r\n", "the last chunk")) == "0\r\n\r\n");
  up->send("0\r\n\r\n");
  KJ_EXPECT(KJ_ASSERT_NONNULL(down->tryReadThrough("\r\n\r\n", "the end")) == "0\r\n\r\n");
  roundTripOn(env, *up, "/after");
  env.expectAccounted();
  KJ_EXPECT(env.pool->getStats().dropped() == 0, env.stats());
}

kj::Own<kj::HttpClient> webSocketClient(kj::HttpHeaderTable& table, kj::AsyncIoStream& stream,
    kj::EntropySource& entropy) {
  kj::HttpClientSettings settings;
  settings.entropySource = entropy;
  return kj::newHttpClient(table, stream, settings);
}

kj::String switchingFor(kj::StringPtr requestHead) {
  auto key = KJ_ASSERT_NONNULL(headerOf(requestHead, "Sec-WebSocket-Key"), requestHead);
  return kj::str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
      "Connection: Upgrade\r\nSec-WebSocket-Accept: ", test::webSocketAccept(key), "\r\n\r\n");
}

kj::StringPtr textOf(kj::WebSocket::Message& message) {
  KJ_IF_SOME(text, message.tryGet<kj::String>()) {
    return text;
  }
  KJ_FAIL_ASSERT("expected a text message");
}

KJ_TEST("downstream: a WebSocket through the proxy carries messages both ways (the upstream's "
        "first frame too), leaves the pool, and closes when either side goes") {
  ProxyEnv env;
  QuietEntropy entropy;
  for (bool clientLeaves: {true, false}) {
    KJ_CONTEXT(clientLeaves);
    auto downStream = within(env, env.proxyAddress->connect(), "connecting to the proxy");
    auto client = webSocketClient(env.table, *downStream, entropy);
    kj::HttpHeaders headers(env.table);
    headers.set(kj::HttpHeaderId::HOST, "proxy.test");
    auto opening = client->openWebSocket("/ws", headers);
    auto up = env.acceptUpstream();
    auto handshake = up->readRequest();
    KJ_EXPECT(headerOf(handshake.head, "Upgrade").orDefault(kj::str("?")) == "websocket",
        handshake.head);
    // The upstream speaks first, in the same write as its 101.
    up->send(kj::str(switchingFor(handshake.head), char(0x81), char(5), "first"));
    auto response = within(env, kj::mv(opening), "the downstream handshake");
    KJ_ASSERT(response.statusCode == 101, response.statusCode);
    auto ws = kj::mv(KJ_ASSERT_NONNULL(
        response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>()));
    auto first = within(env, ws->receive(), "the upstream's first message");
    KJ_EXPECT(textOf(first) == "first");
    auto upWs = kj::newWebSocket(up->release(), nullptr);
    within(env, ws->send("ping"_kj), "sending downstream to upstream");
    auto ping = within(env, upWs->receive(), "the message at the upstream");
    KJ_EXPECT(textOf(ping) == "ping");
    within(env, upWs->send("pong"_kj), "sending upstream to downstream");
    auto pong = within(env, ws->receive(), "the message at the client");
    KJ_EXPECT(textOf(pong) == "pong");
    // The upgraded connection is no longer the pool's: it counts as dropped (upgraded), while
    // the WebSocket keeps the socket.
    KJ_EXPECT(env.pool->getOpenCount() == 0 && env.liveStreams == 1, env.stats());
    if (clientLeaves) {
      ws = nullptr;
      client = nullptr;
      downStream = nullptr;
      auto e = env.failureOf(upWs->receive());
      KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
      upWs = nullptr;
    } else {
      upWs = nullptr;
      auto e = env.failureOf(ws->receive());
      KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
      // newHttpService() keeps both WebSockets until both directions' pumps end, so the proxy's
      // socket to the upstream lives until the client goes too (kj-http's doing).
      ws = nullptr;
      client = nullptr;
      downStream = nullptr;
    }
    env.waitFor([&]() { return env.liveStreams == 0; });
    KJ_EXPECT(env.liveStreams == 0, "the upgraded socket outlived both ends", env.stats());
  }
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 2 && s.droppedUpgraded == 2 && s.dropped() == 2, env.stats());
  roundTripNew(env, "/after");
}

KJ_TEST("downstream: a WebSocket handshake the upstream refuses (403) is an ordinary response; "
        "the connection is reused") {
  ProxyEnv env;
  QuietEntropy entropy;
  auto downStream = within(env, env.proxyAddress->connect(), "connecting to the proxy");
  auto client = webSocketClient(env.table, *downStream, entropy);
  kj::HttpHeaders headers(env.table);
  headers.set(kj::HttpHeaderId::HOST, "proxy.test");
  auto opening = client->openWebSocket("/ws", headers);
  auto up = env.acceptUpstream();
  up->readRequest();
  up->send("HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\n\r\nnot you");
  auto response = within(env, kj::mv(opening), "the refused handshake");
  KJ_EXPECT(response.statusCode == 403);
  auto& body =
      *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>());
  KJ_EXPECT(within(env, body.readAllText(), "the refusal's body") == "not you");
  roundTripOn(env, *up, "/after");
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.reuses == 1 && s.dropped() == 0, env.stats());
}

KJ_TEST("downstream: hop-by-hop request headers are not forwarded, whether the request is sent "
        "at once or queued; the upstream connection is reused") {
  ProxyEnv env(poolSettings(1));
  auto up = roundTripNew(env, "/warm");
  auto hopByHop = "Connection: close, X-Private\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
      "X-End-To-End: yes\r\n"_kj;
  auto check = [&](kj::StringPtr head) {
    for (auto name: {"Connection"_kj, "Keep-Alive"_kj, "TE"_kj}) {
      KJ_EXPECT(headerOf(head, name) == nullptr, "a hop-by-hop header was forwarded", name, head);
    }
    KJ_EXPECT(headerOf(head, "X-End-To-End").orDefault(kj::str("?")) == "yes", head);
  };
  // At once, on the idle connection.
  auto down = env.client();
  down->send(get("/now", hopByHop));
  auto request = up->readRequest();
  check(request.head);
  // Queued behind it (the pool sends its own copy of the request later).
  auto queued = env.client();
  queued->send(get("/queued", hopByHop));
  env.settle();
  KJ_EXPECT(env.pool->getWaitingCount() == 1, env.stats());
  up->send(okFor("/now"));
  KJ_EXPECT(down->readResponse().body.data == bodyFor("/now"));
  request = up->readRequest();
  KJ_EXPECT(request.path == "/queued", request.head);
  check(request.head);
  up->send(okFor("/queued"));
  KJ_EXPECT(queued->readResponse().body.data == bodyFor("/queued"));
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.reuses == 2 && s.dropped() == 0, env.stats());
}

// =================================================================================================
// Upstreams that misbehave

KJ_TEST("upstream: garbage right after a response poisons the connection; the response itself "
        "reaches the client whole") {
  ProxyEnv env;
  auto down = env.client();
  down->send(get("/g"));
  auto up = env.acceptUpstream();
  up->readRequest();
  up->send(kj::str(okFor("/g"), "GARBAGE"));
  auto response = down->readResponse();
  KJ_EXPECT(response.status == 200 && response.body.data == bodyFor("/g"), response.body.data);
  KJ_EXPECT(down->quietFor(20 * kj::MILLISECONDS), "garbage reached the client",
      down->leftover());
  expectClosedByPool(*up, "it sent bytes after the response");
  down->send(get("/after-on-same-client"));
  auto up2 = env.acceptUpstream();
  KJ_EXPECT(up2->readRequest().path == "/after-on-same-client");
  up2->send(okFor("/after-on-same-client"));
  KJ_EXPECT(down->readResponse().body.data == bodyFor("/after-on-same-client"));
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 2 && s.droppedUnsolicitedBytes == 1 && s.dropped() == 1,
      env.stats());
}

KJ_TEST("upstream: a response sent on an idle connection poisons it, even when the next request "
        "comes at once (ten times)") {
  ProxyEnv env;
  auto up = roundTripNew(env, "/start");
  for (unsigned i = 0; i < 10; i++) {
    auto path = kj::str("/next", i);
    auto down = env.client();
    // The upstream sends a whole response nobody asked for; the client's request follows at once
    // (in the same turn of the loop, or a little later).
    up->send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!");
    if (i % 2 == 1) env.settle(1 * kj::MILLISECONDS);
    down->send(get(path));
    auto up2 = env.acceptUpstream(kj::str("a new connection for ", path));
    auto request = up2->readRequest();
    KJ_EXPECT(request.path == path, request.head);
    up2->send(okFor(path));
    auto response = down->readResponse();
    KJ_EXPECT(response.body.data == bodyFor(path), "a poisoned connection answered",
        response.body.data);
    expectClosedByPool(*up, "it sent a response while idle");
    up = kj::mv(up2);
  }
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 11 && s.droppedUnsolicitedBytes == 10 && s.dropped() == 10,
      env.stats());
}

KJ_TEST("upstream: a body sent with a HEAD, 204 or 304 response poisons the connection") {
  ProxyEnv env;
  auto down = env.client();
  struct Case {
    kj::StringPtr request;
    kj::StringPtr method;
    kj::StringPtr reply;
    unsigned status;
  };
  Case cases[] = {
      {"HEAD /h HTTP/1.1\r\nHost: proxy.test\r\n\r\n", "HEAD",
       "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200},
      {"GET /n HTTP/1.1\r\nHost: proxy.test\r\n\r\n", "GET",
       "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 204},
      {"GET /m HTTP/1.1\r\nHost: proxy.test\r\n\r\n", "GET",
       "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello", 304},
  };
  for (auto& c: cases) {
    KJ_CONTEXT(c.reply);
    down->send(c.request);
    auto up = env.acceptUpstream();
    up->readRequest();
    up->send(c.reply);
    auto response = down->readResponse(c.method);
    KJ_EXPECT(response.status == c.status, response.head);
    expectClosedByPool(*up, "it sent a body where none may be");
  }
  KJ_EXPECT(down->quietFor(20 * kj::MILLISECONDS), "body bytes reached the client",
      down->leftover());
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 3 && s.droppedUnsolicitedBytes == 3 && s.dropped() == 3,
      env.stats());
  roundTripNew(env, "/after");
}

KJ_TEST("upstream: closes mid-body (Content-Length): the client gets a short body and a closed "
        "connection; counted as failed") {
  ProxyEnv env;
  auto down = env.client();
  down->send(get("/cut"));
  auto up = env.acceptUpstream();
  up->readRequest();
  up->send("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly some");
  env.settle();
  {
    // kj::HttpServer (0.9.2), not sockfetch, logs this: after the service failed mid-response
    // (DISCONNECTED: "the connection closed before the end of the response body") it still
    // flushes, and its half-written body refuses. The same happens with kj's own client.
    KJ_EXPECT_LOG(ERROR, "previous HTTP message body incomplete");
    up->close();
    auto response = down->readResponse();
    KJ_EXPECT(response.status == 200 && !response.body.complete &&
        response.body.data == "only some", response.body.data);
    KJ_EXPECT(down->eof);
  }
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.droppedFailed == 1 && s.dropped() == 1, env.stats());
  roundTripNew(env, "/after");
}

KJ_TEST("kj-http, not sockfetch: an upstream that closes mid-body (chunked) reaches the client "
        "as a complete chunked response (kj's own client does the same)") {
  // newHttpService() pumps the response body into kj::HttpServer's chunked writer and drops the
  // writer whether the pump succeeded or failed; the writer, dropped, writes the last chunk. So a
  // cut upstream response becomes a well-formed, truncated one downstream. sockfetch fails the
  // body read as it should (DISCONNECTED, "the connection closed before the end of the response
  // body"), counts the drop and closes the connection; kj-http's own client proxies the same
  // truncated response. Pinned so that a change on either side shows.
  auto scenario = [](test::LoopEnv& env, Wire& down, kj::Function<kj::Own<Wire>()> accept) {
    down.send(get("/cut"));
    auto up = accept();
    up->readRequest();
    up->send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nonly some\r\n");
    env.settle();
    up->close();
    auto response = down.readResponse();
    KJ_EXPECT(response.status == 200 && response.body.data == "only some");
    KJ_EXPECT(response.body.complete,
        "kj-http no longer completes a cut chunked response: update this test");
  };
  ProxyEnv env;
  {
    auto down = env.client();
    scenario(env, *down, [&]() { return env.acceptUpstream(); });
    env.expectAccounted();
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.connectionsOpened == 1 && s.droppedFailed == 1 && s.dropped() == 1, env.stats());
    roundTripNew(env, "/after");
  }
  KjProxy kjProxy(env);
  auto down = kjProxy.connectClient();
  scenario(env, *down, [&]() { return kjProxy.acceptUpstream(); });
}

KJ_TEST("upstream: Connection: close, a body delimited by the close, HTTP/1.0: delivered whole, "
        "never reused, the client's connection kept") {
  ProxyEnv env;
  auto down = env.client();

  down->send(get("/close"));
  auto up = env.acceptUpstream();
  up->readRequest();
  up->send(okFor("/close", "Connection: close\r\n"));
  KJ_EXPECT(down->readResponse().body.data == bodyFor("/close"));
  expectClosedByPool(*up, "it said Connection: close");

  down->send(get("/until-close"));
  up = env.acceptUpstream();
  up->readRequest();
  up->send("HTTP/1.1 200 OK\r\n\r\nuntil the end");
  env.settle();
  up->close();  // the end of the body
  auto delimited = down->readResponse();
  KJ_EXPECT(delimited.body.complete && delimited.body.data == "until the end",
      delimited.body.data);

  down->send(get("/http10"));
  up = env.acceptUpstream();
  up->readRequest();
  up->send("HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\n1.0!");
  KJ_EXPECT(down->readResponse().body.data == "1.0!");
  expectClosedByPool(*up, "it answered HTTP/1.0 without keep-alive");

  down->send(get("/http10-keep-alive"));
  up = env.acceptUpstream();
  up->readRequest();
  up->send("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\nkept");
  KJ_EXPECT(down->readResponse().body.data == "kept");
  roundTripOn(env, *up, "/after");
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 4 && s.droppedConnectionClose == 1 &&
      s.droppedNotReusable == 2 && s.dropped() == 3 && s.reuses == 1, env.stats());
}

KJ_TEST("upstream: interim responses and framing variants (1xx, chunk extensions, trailers, bare "
        "LF, one byte at a time) are read right; the connection stays in use") {
  ProxyEnv env;
  auto up = roundTripNew(env, "/warm");
  auto body = bodyFor("/variant");
  kj::String variants[] = {
      kj::str("HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
          "HTTP/1.1 100 Continue\r\n\r\n", okFor("/variant")),
      kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", kj::hex(body.size()),
          ";name=value\r\n", body, "\r\n0\r\nX-Trailer: t\r\n\r\n"),
      kj::str("HTTP/1.1 200 OK\nContent-Length: ", body.size(), "\n\n", body),
      kj::str("HTTP/1.1 100 Continue\r\n\r\n", chunkedOkFor("/variant")),
  };
  for (unsigned i = 0; i < kj::size(variants); i++) {
    KJ_CONTEXT(i);
    auto down = env.client();
    down->send(get("/variant"));
    KJ_EXPECT(up->readRequest().path == "/variant");
    if (i == 3) {
      up->noDelay();
      within(env, test::trickle(up->getStream(), env.timer, variants[i]), "trickling");
    } else {
      up->send(variants[i]);
    }
    auto response = down->readResponse();
    // kj-http cannot pass interim responses on (HttpService::Response has no way to send one):
    // the client sees the final response only.
    KJ_EXPECT(response.status == 200 && response.body.data == body, response.head,
        response.body.data);
  }
  roundTripOn(env, *up, "/after");
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.reuses == 5 && s.dropped() == 0, env.stats());
}

KJ_TEST("upstream: answers a plain GET with 101: the connection leaves the pool and is never "
        "reused") {
  ProxyEnv env;
  auto down = env.client();
  // kj-http drops the client's Upgrade header (a connection header) on the way: the upstream
  // upgrades unasked.
  down->send(get("/up", "Connection: Upgrade\r\nUpgrade: h2c\r\n"));
  auto up = env.acceptUpstream();
  auto request = up->readRequest();
  KJ_EXPECT(headerOf(request.head, "Upgrade") == nullptr, request.head);
  up->send("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\nRAW");
  // kj::HttpServer passes the 101 on with the upgraded stream as a chunked body: kj-http's
  // doing, pinned here.
  auto head = down->readHead("the proxy's answer");
  KJ_EXPECT(head.startsWith("HTTP/1.1 101"), head);
  KJ_EXPECT(KJ_ASSERT_NONNULL(down->tryReadThrough("RAW\r\n", "the raw bytes")) == "3\r\nRAW\r\n");
  env.settle();
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.stats());
  KJ_EXPECT(env.pool->getStats().droppedUpgraded == 1, env.stats());
  auto other = env.client();
  other->send(get("/other"));
  auto up2 = env.acceptUpstream("a new connection: the upgraded one is not the pool's");
  KJ_EXPECT(up2->readRequest().path == "/other");
  up2->send(okFor("/other"));
  KJ_EXPECT(other->readResponse().body.data == bodyFor("/other"));
  KJ_EXPECT(up->quietFor(20 * kj::MILLISECONDS), "a request went on the upgraded connection",
      up->leftover());
  up->close();
  env.waitFor([&]() { return env.liveStreams == 1; });
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 2 && s.droppedUpgraded == 1 && s.dropped() == 1, env.stats());
}

KJ_TEST("upstream: hangs: a queued client gets 503 after waitTimeout naming the pool's limit; a "
        "client that gives up frees the connection") {
  auto settings = poolSettings(1);
  settings.waitTimeout = 300 * kj::MILLISECONDS;
  ProxyEnv env(kj::mv(settings));
  auto hung = env.client();
  hung->send(get("/hang"));
  auto up = env.acceptUpstream();
  up->readRequest();
  auto queued = env.client();
  queued->send(get("/queued"));
  auto refused = queued->readResponse();
  KJ_EXPECT(refused.status == 503, refused.head);
  KJ_EXPECT(contains(refused.body.data, "waited 300 ms for a free connection to the upstream"),
      refused.body.data);
  KJ_EXPECT(contains(refused.body.data, "raise Settings::waitTimeout or maxConnections"),
      refused.body.data);
  KJ_EXPECT(queued->endsWithin("kj::HttpServer to close after its error"));
  // The hung request's client gives up: kj::HttpServer cancels it, and the pool drops the
  // connection (its response never came) instead of keeping it busy for ever.
  hung->reset();
  expectClosedByPool(*up, "its request was given up");
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1 && s.waits == 1 && s.overloaded == 1 &&
      s.droppedAbandoned == 1 && s.dropped() == 1, env.stats());
  roundTripNew(env, "/after");
}

KJ_TEST("upstream: hangs, then closes a fresh connection: other clients are served meanwhile; "
        "the hung client's connection is closed without an answer") {
  ProxyEnv env(poolSettings(2));
  auto hung = env.client();
  hung->send(get("/hang"));
  auto up = env.acceptUpstream();
  up->readRequest();
  auto up2 = roundTripNew(env, "/served-meanwhile");
  KJ_EXPECT(hung->quietFor(50 * kj::MILLISECONDS), hung->leftover());
  up->close();
  // The pool fails it (DISCONNECTED: a fresh connection, so not the stale keep-alive race, and not
  // retried); kj::HttpServer answers DISCONNECTED by closing the client's connection (its
  // mapping; a 502 would be kinder).
  auto answer = hung->readToEnd("the proxy to close the hung client's connection");
  KJ_EXPECT(answer.data.size() == 0, answer.data);
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 2 && s.droppedFailed == 1 && s.retries == 0 &&
      s.dropped() == 1, env.stats());
  roundTripOn(env, *up2, "/after");
}

KJ_TEST("upstream: the keep-alive race: an idle close is noticed; a GET is retried and a PUT "
        "replayed byte for byte on a new connection; a POST is never sent twice") {
  ProxyEnv env;
  auto up = roundTripNew(env, "/warm");

  // The upstream closes the idle connection; the next request follows at once.
  up->close();
  auto down = env.client();
  down->send(get("/after-idle-close"));
  up = env.acceptUpstream();
  KJ_EXPECT(up->readRequest().path == "/after-idle-close");
  up->send(okFor("/after-idle-close"));
  KJ_EXPECT(down->readResponse().body.data == bodyFor("/after-idle-close"));

  // It reads a GET on the reused connection and closes without answering.
  down->send(get("/retry-me"));
  KJ_EXPECT(up->readRequest().path == "/retry-me");
  up->close();
  up = env.acceptUpstream("a new connection for the retry");
  KJ_EXPECT(up->readRequest().path == "/retry-me");
  up->send(okFor("/retry-me"));
  KJ_EXPECT(down->readResponse().body.data == bodyFor("/retry-me"));

  // The same with a PUT: the pool buffered its body and replays it exactly.
  auto putBody = pattern(5000, 9);
  down->send(kj::str("PUT /put HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 5000\r\n\r\n",
      putBody));
  auto first = up->readRequest();
  KJ_EXPECT(first.path == "/put" && first.body.data == putBody);
  up->close();
  up = env.acceptUpstream("a new connection for the replay");
  auto replay = up->readRequest();
  KJ_EXPECT(replay.method == "PUT" && replay.path == "/put" && replay.body.data == putBody,
      replay.head);
  up->send(okFor("/put"));
  KJ_EXPECT(down->readResponse("PUT").body.data == bodyFor("/put"));

  // A POST that reached the upstream is not resent: the client's connection is closed (kj's
  // answer to DISCONNECTED), the upstream never sees it twice.
  down->send("POST /once HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 3\r\n\r\nabc");
  KJ_EXPECT(up->readRequest().path == "/once");
  up->close();
  KJ_EXPECT(env.noNewUpstream(100 * kj::MILLISECONDS), "a POST was sent twice");
  KJ_EXPECT(down->readToEnd("the proxy to close the connection").data.size() == 0);

  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 4 && s.retries == 2 && s.droppedPeerClosedIdle == 1 &&
      s.droppedStale == 3 && s.dropped() == 4, env.stats());
  roundTripNew(env, "/after");
}

KJ_TEST("upstream: a malformed response is a 500 that names the upstream; conflicting framing "
        "is never reused; a refused connect closes the client's connection") {
  ProxyEnv env;
  auto down = env.client();
  down->send(get("/bad"));
  auto up = env.acceptUpstream();
  up->readRequest();
  up->send("this is not http\r\n\r\n");
  auto response = down->readResponse();
  // The 500 (and its text, "The server threw an exception", with the details) is kj::HttpServer's
  // mapping of FAILED; sockfetch's part says what went wrong and where.
  KJ_EXPECT(response.status == 500, response.head);
  KJ_EXPECT(contains(response.body.data, "the server's answer is not HTTP/1.x (it began with "
      "\"this is not http\")") &&
      contains(response.body.data, "check that the upstream address is an HTTP server"),
      response.body.data);
  expectClosedByPool(*up, "it sent a malformed response");

  auto down2 = env.client();
  down2->send(get("/both"));
  up = env.acceptUpstream();
  up->readRequest();
  up->send("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
      "5\r\nhello\r\n0\r\n\r\n");
  auto both = down2->readResponse();
  KJ_EXPECT(both.status == 200 && both.body.data == "hello", both.body.data);
  expectClosedByPool(*up, "its framing was ambiguous");
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 2 && s.droppedFailed == 1 && s.droppedNotReusable == 1 &&
      s.dropped() == 2, env.stats());

  env.upstreamListener = nullptr;  // the upstream is down
  auto down3 = env.client();
  down3->send(get("/down"));
  KJ_EXPECT(down3->readToEnd("the proxy to close the connection").data.size() == 0);
  env.expectAccounted();
  KJ_EXPECT(env.pool->getStats().connectFailures == 1, env.stats());
}

KJ_TEST("upstream on a unix socket: reuse, an idle close, poisoning and the counts") {
  ProxyEnv env(poolSettings(), true);
  auto up = roundTripNew(env, "/u1");
  roundTripOn(env, *up, "/u2");
  up->send("GARBAGE");
  expectClosedByPool(*up, "it sent bytes while idle");
  up = roundTripNew(env, "/u3");
  up->close();
  env.settle();
  up = roundTripNew(env, "/u4");
  roundTripOn(env, *up, "/u5");
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 3 && s.reuses == 2 && s.droppedUnsolicitedBytes == 1 &&
      s.droppedPeerClosedIdle == 1 && s.dropped() == 2, env.stats());
}

// =================================================================================================
// Tearing down

KJ_TEST("teardown: the proxy shut down mid-flight (a request awaiting its answer, one mid-upload, "
        "one mid-download, one queued): every upstream connection closed and counted") {
  ProxyEnv env(poolSettings(3));
  auto downA = env.client();
  downA->send(get("/a"));
  auto upA = env.acceptUpstream();
  upA->readRequest();
  auto downB = env.client();
  downB->send("POST /b HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\n"
      "3\r\nabc\r\n");
  auto upB = env.acceptUpstream();
  upB->readHead("b's head");
  KJ_EXPECT(upB->tryReadThrough("abc\r\n", "b's first chunk") != nullptr);
  auto downC = env.client();
  downC->send(get("/c"));
  auto upC = env.acceptUpstream();
  upC->readRequest();
  upC->send("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial");
  downC->readHead("c's head");
  auto downD = env.client();
  downD->send(get("/d"));
  env.settle();
  KJ_EXPECT(env.pool->getWaitingCount() == 1 && env.pool->getOpenCount() == 3, env.stats());
  env.stopProxy();
  expectClosedByPool(*upA, "the proxy went");
  expectClosedByPool(*upB, "the proxy went (mid-upload: no last chunk)");
  expectClosedByPool(*upC, "the proxy went");
  for (auto down: {&downA, &downB, &downC, &downD}) {
    (*down)->readToEnd("the proxy's connection to close");
  }
  env.expectAccounted();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 3 && s.droppedAbandoned == 3 && s.dropped() == 3 &&
      s.waits == 1, env.stats());
  KJ_EXPECT(env.noNewUpstream(), "the queued request was sent after the proxy went");
}

KJ_TEST("teardown: the pool destroyed while the proxy still serves: the queued request fails, "
        "the in-flight ones finish and their connections close") {
  ProxyEnv env(poolSettings(2));
  auto downA = env.client();
  downA->send(get("/a"));
  auto upA = env.acceptUpstream();
  upA->readRequest();
  upA->send("HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n0123456789");
  KJ_EXPECT(downA->readHead("a's head").startsWith("HTTP/1.1 200"));
  auto downB = env.client();
  auto bodyB = pattern(100000, 8);
  downB->send(kj::str("POST /b HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 100000\r\n\r\n",
      bodyB.slice(0, 4)));
  auto upB = env.acceptUpstream();
  upB->readHead("b's head");
  auto downC = env.client();
  downC->send(get("/c"));
  env.settle();
  KJ_EXPECT(env.pool->getWaitingCount() == 1, env.stats());

  env.pool = nullptr;  // the proxy (kj::HttpServer, newHttpService) still runs

  KJ_EXPECT(downC->readToEnd("the queued request to fail").data.size() == 0);
  upA->send("abcdefghij");
  auto restA = downA->readFixed(20, "a's body");
  KJ_EXPECT(restA.complete && restA.data == "0123456789abcdefghij", restA.data);
  expectClosedByPool(*upA, "its pool is gone");
  auto sending = downB->sendLater(kj::heapString(bodyB.slice(4)));
  auto b = upB->readFixed(100000, "b's body");
  within(env, kj::mv(sending), "b's upload");
  KJ_EXPECT(b.complete && b.data == bodyB);
  upB->send(okFor("/b"));
  KJ_EXPECT(downB->readResponse("POST").body.data == bodyFor("/b"));
  expectClosedByPool(*upB, "its pool is gone");
  // (The proxy must go before its clients send again: newHttpService() holds the pool by
  // reference.)
  env.stopProxy();
  env.settle();
  KJ_EXPECT(env.liveStreams == 0, env.liveStreams);
}

// =================================================================================================
// Early answers

KJ_TEST("an early final response to a streamed upload: the proxy's client finishes its upload and "
        "keeps its connection, as with kj-http's own client") {
  // An upstream may answer a request before reading its body (413 Payload Too Large, 401, 303)
  // and, without `Connection: close`, read and discard the rest (RFC 9110 15.5.14, RFC 9112 9.3).
  // Through the proxy, newHttpService() pumps that answer to the client at once, so sockfetch
  // sees the response read to its end before the request body was written: it closes the
  // upstream connection (REQUEST_INCOMPLETE) and takes the rest of the body, discarding it.
  // Were the body's writes refused instead, newHttpService()'s request-body pump would fail, and
  // kj::HttpServer would close the client's connection while the client still sends its body (a
  // reset; it was so until this test). With kj-http's own client in the same place the body goes
  // on to the upstream, which discards it, and the client's connection stays up (checked below).
  auto scenario = [](test::LoopEnv& env, Wire& down, kj::Function<kj::Own<Wire>()> accept) {
    size_t declared = 300000;  // beyond maxReplayBodyBytes: streamed
    auto body = pattern(declared, 5);
    down.send(kj::str("POST /big HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: ", declared,
        "\r\n\r\n"));
    auto up = accept();
    up->readHead("the upload's head");
    up->send("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!");
    auto answer = down.readResponse("POST");
    KJ_EXPECT(answer.status == 413 && answer.body.data == "too big!", answer.body.data);
    // The client finishes its upload (as an HTTP/1.1 client must, to keep the connection), and
    // the upstream discards what it gets (all of it, or up to where the proxy closed).
    auto sending = down.sendLater(kj::heapString(body));
    up->readFixed(declared, "the upstream discarding the rest");
    auto sent = sending.then([]() { return true; }, [](kj::Exception&&) { return false; });
    KJ_EXPECT(within(env, kj::mv(sent), "the client's upload"), "the client's upload failed");
    env.settle();
    KJ_EXPECT(down.quietFor(30 * kj::MILLISECONDS) && !down.sawReset,
        "the proxy closed (or reset) the client's connection after an early answer",
        down.eof, down.sawReset);
    if (down.eof) return;
    down.send(get("/next"));
    // On the same upstream connection if the proxy kept it, else on a new one.
    kj::Own<Wire> next;
    if (up->quietFor(100 * kj::MILLISECONDS) || up->eof) {
      next = accept();
    } else {
      next = kj::mv(up);
    }
    KJ_EXPECT(next->readRequest().path == "/next");
    next->send(okFor("/next"));
    KJ_EXPECT(down.readResponse().body.data == bodyFor("/next"));
  };

  // kj-http's own client: the connection survives (the reference behaviour).
  {
    test::LoopEnv env;
    KjProxy kjProxy(env);
    auto down = kjProxy.connectClient();
    scenario(env, *down, [&]() { return kjProxy.acceptUpstream(); });
  }

  ProxyEnv env;
  auto down = env.client();
  scenario(env, *down, [&]() { return env.acceptUpstream(); });
  env.expectAccounted();
}

}  // namespace
}  // namespace sockfetch
