// Request-side misuse by callers: StreamFetcher and ConnectionPool used in legal but careless ways
// on the request side, over real loopback TCP, with the server end a raw socket the test reads
// byte for byte. A header kj-http lets through although it is no HTTP field (an empty name); a
// body write refused for its length, then the body finished right; a body declared but cut short
// after a pooled connection took it; a HEAD with a body; a DELETE whose chunked body stays open;
// a second request while the first one's body is still open; a very long url sent later from the
// pool's copy; whenWriteDisconnected() on a pooled streamed body; and a body write whose promise
// the caller waits on late (after the response, or after dropping the body). For each: what the
// server receives, whether the connection is reused (only after a complete, consistent request),
// what the error says, and the pool's count of the drop. Every wait is bounded.

#include "pool.h"
#include "stream-fetcher.h"

#include <sockfetch/fetcher-env.h>
#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <malloc.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

namespace sockfetch {
namespace {

using test::contains;
using test::OK_HELLO;
using test::Peer;
using State = StreamFetcher::State;

// =================================================================================================
// Helpers

struct PoolEnv: public test::LoopEnv {
  // A ConnectionPool to a loopback listener whose connections the test accepts as raw Peers.
  kj::Own<kj::ConnectionReceiver> listener;
  kj::Own<kj::NetworkAddress> address;
  kj::Own<ConnectionPool> pool;

  explicit PoolEnv(ConnectionPool::Settings settings = {}) {
    auto& network = io.provider->getNetwork();
    listener = network.parseAddress("127.0.0.1", 0).wait(ws)->listen();
    address = network.parseAddress("127.0.0.1", listener->getPort()).wait(ws);
    pool = kj::heap<ConnectionPool>(timer, table, *address, kj::mv(settings));
  }

  kj::Own<Peer> accept() { return kj::heap<Peer>(ws, bounded(listener->accept())); }

  bool noNewConnection() {
    // No connection is opened within a little while.
    return listener->accept().then([](auto&&) { return false; })
        .exclusiveJoin(timer.afterDelay(50 * kj::MILLISECONDS).then([]() { return true; }))
        .wait(ws);
  }

  void getOn(Peer& peer, kj::StringPtr url) {
    // A GET that must go on `peer`'s connection and come back whole.
    auto req = pool->request(kj::HttpMethod::GET, url, headers());
    req.body = nullptr;
    auto head = peer.readRequest();
    KJ_EXPECT(head.startsWith(kj::str("GET ", url, " HTTP/1.1\r\n")), head);
    auto written = peer.sendLater(OK_HELLO);
    auto r = bounded(kj::mv(req.response));
    KJ_EXPECT(bounded(r.body->readAllText()) == "hello");
    bounded(kj::mv(written));
  }
};

kj::Maybe<kj::Exception> writeFailure(test::LoopEnv& env, kj::AsyncOutputStream& body,
    kj::StringPtr bytes) {
  return test::failureIfAny(env, kj::evalNow([&]() { return writeAll(body, bytes.asBytes()); }));
}

// =================================================================================================
// Header fields that are no HTTP field

KJ_TEST("a header with an empty name (kj::HttpHeaders::add(\"\", v) accepts it) is refused at "
    "once, writing nothing, by StreamFetcher and ConnectionPool alike") {
  // Contract: request() refuses at once (FAILED, writing nothing) what would put a malformed
  // request head on the wire: the library already does so for the url, which kj-http writes
  // unchecked. kj-http 0.9.2 refuses header values with CR, LF or NUL and names with non-token
  // characters, but lets an EMPTY name through (HttpHeaders::add("", "v") succeeds, serialize
  // writes ": v"). RFC 9110 5.1: field-name = token, 1*tchar; a server answers 400 and closes,
  // and intermediaries disagree on such a line (it is a known request-smuggling lever).
  // request() throws FAILED, nothing is written (no line ": v"), the connection stays IDLE.
  {
    test::FetcherEnv env(true);
    auto h = env.headers();
    h.add("", "v");
    kj::Maybe<kj::HttpClient::Request> sent;
    auto failure = kj::runCatchingExceptions([&]() {
      sent = env.fetcher->request(kj::HttpMethod::GET, "/empty-name", h);
    });
    KJ_IF_SOME(req, sent) {
      auto head = env.peer->readHead();
      KJ_EXPECT(!contains(head, "\r\n: v\r\n"), "StreamFetcher sent a field line without a name",
          head);
      req.body = nullptr;
    } else {
      auto& e = KJ_ASSERT_NONNULL(failure);
      KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
      KJ_EXPECT(env.peer->readWouldBlock(), "a refused request wrote something");
      KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.fetcher->getState());
    }
  }
  {
    PoolEnv env;
    auto h = env.headers();
    h.add("", "v");
    kj::Maybe<kj::HttpClient::Request> sent;
    auto failure = kj::runCatchingExceptions([&]() {
      sent = env.pool->request(kj::HttpMethod::GET, "/empty-name", h);
    });
    KJ_IF_SOME(req, sent) {
      req.body = nullptr;
      auto response = req.response.eagerlyEvaluate([](kj::Exception&&) {
        return kj::HttpClient::Response();
      });
      auto peer = env.accept();
      auto head = peer->readHead();
      KJ_EXPECT(!contains(head, "\r\n: v\r\n"), "ConnectionPool sent a field line without a name",
          head);
    } else {
      auto& e = KJ_ASSERT_NONNULL(failure);
      KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
      KJ_EXPECT(env.noNewConnection(), "a refused request opened a connection");
    }
  }
}

// =================================================================================================
// Bodies written wrong, then right

KJ_TEST("a body write refused as longer than declared takes nothing: the body then written right "
    "goes out byte for byte and the connection is reused (StreamFetcher over TCP)") {
  // Contract: a write past the declared size fails FAILED at once ("longer than the declared"),
  // and none of it reaches the connection or counts; the request is still whole when the right
  // bytes follow, so the exchange is clean and the connection comes back.
  test::FetcherEnv env(true);
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/put", env.headers(), uint64_t(5));
  auto e = KJ_ASSERT_NONNULL(writeFailure(env, *req.body, "toolong"));
  KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
  KJ_EXPECT(contains(e.getDescription(), "longer than the declared 5 bytes"), e.getDescription());
  KJ_EXPECT(writeFailure(env, *req.body, "hel") == nullptr);
  KJ_EXPECT(writeFailure(env, *req.body, "lo!") != nullptr, "a write crossing the end was taken");
  KJ_EXPECT(writeFailure(env, *req.body, "lo") == nullptr);
  req.body = nullptr;
  auto request = env.peer->readRequest();
  KJ_EXPECT(contains(request, "\r\nContent-Length: 5\r\n"), request);
  KJ_EXPECT(request.endsWith("\r\n\r\nhello"), request);
  KJ_EXPECT(env.peer->readWouldBlock(), "bytes of a refused write reached the wire");
  auto written = env.peer->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
  env.roundTrip();
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 2);
}

void overlongThenRight(size_t maxReplayBodyBytes) {
  KJ_CONTEXT(maxReplayBodyBytes);
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = maxReplayBodyBytes;
  PoolEnv env(kj::mv(settings));
  auto req = env.pool->request(kj::HttpMethod::POST, "/put", env.headers(), uint64_t(5));
  auto response = req.response.eagerlyEvaluate(nullptr);
  auto e = KJ_ASSERT_NONNULL(writeFailure(env, *req.body, "toolong"));
  KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
  KJ_EXPECT(contains(e.getDescription(), "longer than the declared 5 bytes"), e.getDescription());
  KJ_EXPECT(writeFailure(env, *req.body, "hello") == nullptr);
  req.body = nullptr;
  auto peer = env.accept();
  auto request = peer->readRequest();
  KJ_EXPECT(request.startsWith("POST /put HTTP/1.1\r\n"), request);
  KJ_EXPECT(contains(request, "\r\nContent-Length: 5\r\n"), request);
  KJ_EXPECT(request.endsWith("\r\n\r\nhello"), request);
  KJ_EXPECT(peer->readWouldBlock(), "bytes of a refused write reached the wire");
  auto written = peer->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  env.getOn(*peer, "/next");
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1, s.connectionsOpened);
  KJ_EXPECT(s.reuses == 1, s.reuses);
  KJ_EXPECT(s.dropped() == 0, s.dropped());
}

KJ_TEST("a body write refused as longer than declared takes nothing, through a ConnectionPool "
    "(buffered and streamed): the body then written right goes out byte for byte, then reuse") {
  // Contract: as for StreamFetcher; a buffered body must not keep any of the refused write (it
  // would make the body long or complete it), and a streamed one must not pass it on.
  overlongThenRight(64 * 1024);
  overlongThenRight(0);
}

KJ_TEST("a streamed pool body declared 10 bytes, cut after 4 and dropped once a connection took "
    "it: the server gets the head and exactly 4 bytes, then the close; the response fails FAILED "
    "saying what to do; counted as abandoned; the next request opens a new connection") {
  // Contract: the connection is never reused after an incomplete request; the error says what
  // happened (4 of 10 bytes) and what to do (finish every write before dropping the body); the
  // pool counts the drop with its reason; the server is not left waiting for 6 more bytes.
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = 0;
  PoolEnv env(kj::mv(settings));
  auto req = env.pool->request(kj::HttpMethod::POST, "/cut", env.headers(), uint64_t(10));
  auto write = writeAll(*req.body, "four"_kj.asBytes());
  auto peer = env.accept();
  auto head = peer->readHead();
  KJ_EXPECT(head.startsWith("POST /cut HTTP/1.1\r\n"), head);
  KJ_EXPECT(contains(head, "Content-Length: 10\r\n"), head);
  KJ_EXPECT(peer->readExactly(4) == "four");
  env.bounded(kj::mv(write));
  req.body = nullptr;
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
  KJ_EXPECT(contains(e.getDescription(), "4 of its 10 bytes"), e.getDescription());
  KJ_EXPECT(contains(e.getDescription(), "before dropping the body stream"), e.getDescription());
  KJ_EXPECT(env.drainsToEnd(*peer), "the server was left waiting for the rest of the body");
  env.settle();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.droppedAbandoned == 1, s.droppedAbandoned);
  KJ_EXPECT(s.retries == 0, "a request cut short by its caller was sent again");
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  auto req2 = env.pool->request(kj::HttpMethod::GET, "/after", env.headers());
  req2.body = nullptr;
  auto peer2 = env.accept();
  KJ_EXPECT(peer2->readRequest().startsWith("GET /after HTTP/1.1\r\n"));
  auto written = peer2->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(req2.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  KJ_EXPECT(s.connectionsOpened == 2, s.connectionsOpened);
}

KJ_TEST("ConnectionPool (streamed body): a write that finished counts as finished before its "
    "promise is waited on: the next write is taken, the request completes and the connection is "
    "reused") {
  // Contract: a write of a streamed body ends when its bytes reached the connection, whether or
  // not (or when) the caller waits for it; only a write that has not finished (or was given up
  // on) holds back the next one. The first write's promise is kept, unwaited, until the end.
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = 0;
  PoolEnv env(kj::mv(settings));
  auto req = env.pool->request(kj::HttpMethod::POST, "/two", env.headers(), uint64_t(8));
  auto first = req.body->write("four", 4);
  auto peer = env.accept();
  KJ_EXPECT(peer->readHead().startsWith("POST /two HTTP/1.1\r\n"));
  KJ_EXPECT(peer->readExactly(4) == "four");
  env.settle();
  auto second = req.body->write("more", 4);
  KJ_EXPECT(peer->readExactly(4) == "more");
  env.bounded(kj::mv(second));
  env.bounded(kj::mv(first));
  req.body = nullptr;
  auto written = peer->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  env.settle();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.dropped() == 0 && env.pool->getIdleCount() == 1, s.dropped(),
      env.pool->getIdleCount());
  env.getOn(*peer, "/after");
  KJ_EXPECT(s.reuses == 1, s.reuses);
}

// =================================================================================================
// Methods with and without a body

KJ_TEST("a HEAD sent with a body (expectedBodySize 3): the server gets Content-Length 3 and the "
    "body; the answer's Content-Length 50 frames no body; the connection is reused in step "
    "(StreamFetcher and ConnectionPool over TCP)") {
  // Contract: a request body on a HEAD is sent as declared (as kj-http frames it), and the response
  // is still framed by the method (a HEAD response has no body whatever its Content-Length): the
  // next response on the connection is read as the next request's, not as this one's body.
  constexpr kj::StringPtr HEAD_REPLY = "HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"_kj;
  {
    test::FetcherEnv env(true);
    auto req = env.fetcher->request(kj::HttpMethod::HEAD, "/h", env.headers(), uint64_t(3));
    env.bounded(writeAll(*req.body, "abc"_kj.asBytes()));
    req.body = nullptr;
    auto request = env.peer->readRequest();
    KJ_EXPECT(request.startsWith("HEAD /h HTTP/1.1\r\n"), request);
    KJ_EXPECT(contains(request, "\r\nContent-Length: 3\r\n"), request);
    KJ_EXPECT(request.endsWith("\r\n\r\nabc"), request);
    auto written = env.peer->sendLater(HEAD_REPLY);
    auto r = env.bounded(kj::mv(req.response));
    KJ_EXPECT(r.statusCode == 200);
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "");
    env.bounded(kj::mv(written));
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
    env.roundTrip("/after-head");
  }
  {
    PoolEnv env;
    auto req = env.pool->request(kj::HttpMethod::HEAD, "/h", env.headers(), uint64_t(3));
    env.bounded(writeAll(*req.body, "abc"_kj.asBytes()));
    req.body = nullptr;
    auto response = kj::mv(req.response);
    auto peer = env.accept();
    auto request = peer->readRequest();
    KJ_EXPECT(request.startsWith("HEAD /h HTTP/1.1\r\n"), request);
    KJ_EXPECT(contains(request, "\r\nContent-Length: 3\r\n"), request);
    KJ_EXPECT(request.endsWith("\r\n\r\nabc"), request);
    auto written = peer->sendLater(HEAD_REPLY);
    auto r = env.bounded(kj::mv(response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "");
    env.bounded(kj::mv(written));
    env.getOn(*peer, "/after-head");
    KJ_EXPECT(env.pool->getStats().reuses == 1);
    KJ_EXPECT(env.pool->getStats().dropped() == 0);
  }
}

KJ_TEST("a DELETE made without expectedBodySize (kj-http gives it a chunked body) whose body the "
    "caller keeps open: no terminator is sent until the body is dropped, then exactly one, and "
    "the connection is reused") {
  // Contract: kj-http treats only GET and HEAD as bodiless; any other method without a size gets a
  // chunked body that ends when the caller drops the stream. The library writes the terminator
  // once (never early, never twice), and reuses the connection only after it went out.
  test::FetcherEnv env(true);
  auto req = env.fetcher->request(kj::HttpMethod::DELETE, "/d", env.headers());
  auto head = env.peer->readHead();
  KJ_EXPECT(head.startsWith("DELETE /d HTTP/1.1\r\n"), head);
  KJ_EXPECT(contains(head, "Transfer-Encoding: chunked\r\n"), head);
  env.settle();
  KJ_EXPECT(env.peer->readWouldBlock(), "something was sent before the body was dropped");
  req.body = nullptr;
  KJ_EXPECT(env.peer->readExactly(5) == "0\r\n\r\n");
  env.settle();
  KJ_EXPECT(env.peer->readWouldBlock(), "more than one terminator was sent");
  auto written = env.peer->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
  env.roundTrip();
}

// =================================================================================================
// A second request while the first one's body is open

KJ_TEST("StreamFetcher: request() while the first request's body is half written is refused "
    "(\"one request at a time\"), writes nothing, and the first body goes on to a clean exchange") {
  // Contract: a request while BUSY fails at once, the in-flight one untouched, nothing written;
  // not even a refused request's head may land in the middle of the first one's body.
  test::FetcherEnv env(true);
  auto req = env.fetcher->request(kj::HttpMethod::PUT, "/first", env.headers(), uint64_t(10));
  env.bounded(writeAll(*req.body, "01234"_kj.asBytes()));
  auto head = env.peer->readHead();
  KJ_EXPECT(head.startsWith("PUT /first HTTP/1.1\r\n"), head);
  KJ_EXPECT(env.peer->readExactly(5) == "01234");
  for (auto method: {kj::HttpMethod::GET, kj::HttpMethod::POST}) {
    auto h = env.headers();
    KJ_EXPECT_THROW_MESSAGE("one request at a time",
        env.fetcher->request(method, "/second", h, uint64_t(3)));
  }
  env.settle();
  KJ_EXPECT(env.peer->readWouldBlock(), "a refused request wrote something");
  KJ_EXPECT(env.fetcher->getState() == State::BUSY);
  env.bounded(writeAll(*req.body, "56789"_kj.asBytes()));
  req.body = nullptr;
  KJ_EXPECT(env.peer->readExactly(5) == "56789");
  auto written = env.peer->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
  env.roundTrip("/second");
}

KJ_TEST("ConnectionPool (maxConnections 1): a request made while the first one's streamed body is "
    "half written waits, and then goes on the same connection right after the first exchange, "
    "never inside its body") {
  // Contract: never two requests on one connection; a waiting request is sent from its copy once
  // the connection is clean again, and counted as a wait and a reuse.
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  settings.maxReplayBodyBytes = 0;
  PoolEnv env(kj::mv(settings));
  auto first = env.pool->request(kj::HttpMethod::PUT, "/first", env.headers(), uint64_t(10));
  auto w1 = writeAll(*first.body, "01234"_kj.asBytes());
  auto peer = env.accept();
  auto head = peer->readHead();
  KJ_EXPECT(head.startsWith("PUT /first HTTP/1.1\r\n"), head);
  KJ_EXPECT(peer->readExactly(5) == "01234");
  env.bounded(kj::mv(w1));
  auto h = env.headers();
  h.add("X-Second", "yes");
  auto second = env.pool->request(kj::HttpMethod::GET, "/second", h);
  second.body = nullptr;
  auto secondResponse = second.response.eagerlyEvaluate(nullptr);
  env.settle();
  KJ_EXPECT(peer->readWouldBlock(), "the second request was written inside the first's body");
  KJ_EXPECT(env.pool->getWaitingCount() == 1, env.pool->getWaitingCount());
  env.bounded(writeAll(*first.body, "56789"_kj.asBytes()));
  first.body = nullptr;
  KJ_EXPECT(peer->readExactly(5) == "56789");
  auto written = peer->sendLater(OK_HELLO);
  auto r = env.bounded(kj::mv(first.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  auto request2 = peer->readRequest();
  KJ_EXPECT(request2.startsWith("GET /second HTTP/1.1\r\n"), request2);
  KJ_EXPECT(contains(request2, "X-Second: yes\r\n"), request2);
  auto written2 = peer->sendLater(OK_HELLO);
  auto r2 = env.bounded(kj::mv(secondResponse));
  KJ_EXPECT(env.bounded(r2.body->readAllText()) == "hello");
  env.bounded(kj::mv(written2));
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 1, s.connectionsOpened);
  KJ_EXPECT(s.waits == 1, s.waits);
  KJ_EXPECT(s.reuses == 1, s.reuses);
  KJ_EXPECT(s.dropped() == 0, s.dropped());
}

// =================================================================================================
// A very long url

KJ_TEST("a 200 kB url goes out byte for byte from StreamFetcher, and from a ConnectionPool that "
    "sends it later from its copy (its connection busy); both connections are then reused") {
  // Contract: the library puts no limit of its own on the url, copies it whole (the pool's copy
  // of a request larger than its inline buffer), and a long request line leaves the connection
  // in step.
  auto url = kj::heapString(200000);
  for (size_t i = 0; i < url.size(); i++) url[i] = "abcdefghijklmnopqrstuvwxyz0123456789"[i % 36];
  url[0] = '/';
  {
    test::FetcherEnv env(true);
    auto req = env.fetcher->request(kj::HttpMethod::GET, url, env.headers());
    req.body = nullptr;
    auto head = env.peer->readHead();
    KJ_EXPECT(head.startsWith(kj::str("GET ", url, " HTTP/1.1\r\n")), "the url arrived changed");
    auto written = env.peer->sendLater(OK_HELLO);
    auto r = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
    env.bounded(kj::mv(written));
    env.roundTrip();
  }
  {
    ConnectionPool::Settings settings;
    settings.maxConnections = 1;
    PoolEnv env(kj::mv(settings));
    auto first = env.pool->request(kj::HttpMethod::GET, "/first", env.headers());
    first.body = nullptr;
    auto peer = env.accept();
    KJ_EXPECT(peer->readHead().startsWith("GET /first "));
    kj::Promise<kj::HttpClient::Response> longResponse = nullptr;
    {
      auto h = env.headers();
      auto req = env.pool->request(kj::HttpMethod::GET, url, h);
      req.body = nullptr;
      longResponse = req.response.eagerlyEvaluate(nullptr);
    }  // the caller's url and headers may go now: the pool has its copy
    auto written = peer->sendLater(OK_HELLO);
    auto r = env.bounded(kj::mv(first.response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
    env.bounded(kj::mv(written));
    auto head = peer->readHead();
    KJ_EXPECT(head.startsWith(kj::str("GET ", url, " HTTP/1.1\r\n")), "the url arrived changed");
    KJ_EXPECT(contains(head, "\r\nHost: upstream.test\r\n"), head.slice(head.size() - 100));
    auto written2 = peer->sendLater(OK_HELLO);
    auto r2 = env.bounded(kj::mv(longResponse));
    KJ_EXPECT(env.bounded(r2.body->readAllText()) == "hello");
    env.bounded(kj::mv(written2));
    env.getOn(*peer, "/third");
    KJ_EXPECT(env.pool->getStats().connectionsOpened == 1);
    KJ_EXPECT(env.pool->getStats().dropped() == 0);
  }
}

// =================================================================================================
// whenWriteDisconnected() on a pooled body

KJ_TEST("whenWriteDisconnected() on a ConnectionPool's streamed request body settles when the "
    "server resets the connection carrying it, as StreamFetcher's body does") {
  // Contract: a pool's request body is a kj::AsyncOutputStream like a fetcher's: once a
  // connection took it, whenWriteDisconnected() reports that connection going away (caller-edge
  // checks this for StreamFetcher). A caller streaming an upload from a slow source waits on it
  // to stop producing: it settles once the server resets the connection (as the fetcher's does,
  // and as every later write then fails), not never (kj permits that only for streams that cannot
  // detect a disconnect).
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = 0;
  PoolEnv env(kj::mv(settings));
  env.limit = 500 * kj::MILLISECONDS;
  auto req = env.pool->request(kj::HttpMethod::POST, "/stream", env.headers());
  auto response = req.response.eagerlyEvaluate([](kj::Exception&&) -> kj::HttpClient::Response {
    return {};
  });
  auto write = writeAll(*req.body, "part"_kj.asBytes());
  auto peer = env.accept();
  auto head = peer->readHead();
  KJ_EXPECT(contains(head, "Transfer-Encoding: chunked\r\n"), head);
  KJ_EXPECT(peer->readExactly(9) == "4\r\npart\r\n");
  env.bounded(kj::mv(write));
  auto disconnected = req.body->whenWriteDisconnected();
  KJ_EXPECT(!disconnected.poll(env.ws));
  test::resetConnection(*peer);
  peer = nullptr;
  bool settled = disconnected.then([]() { return true; }, [](kj::Exception&&) { return true; })
      .exclusiveJoin(env.timer.afterDelay(env.limit).then([]() { return false; })).wait(env.ws);
  KJ_EXPECT(settled, "whenWriteDisconnected() did not settle after the connection was reset");
  // Writes do find out: the disconnect is detectable.
  auto later = writeFailure(env, *req.body, "more");
  KJ_EXPECT(later != nullptr, "a write after the reset succeeded");
  req.body = nullptr;
}

// =================================================================================================
// A body write whose promise is waited on only after the response

KJ_TEST("a fixed-length body written in full, its write promise waited on only after the "
    "response (write(...).attach(body)): the server got every byte, and the connection is reused") {
  // Contract: the connection comes back after the response body's end when the exchange left it
  // clean (the whole request written, the response fully framed), and a drop's reason says what
  // happened. A KJ caller may keep a write's promise and wait on it later, e.g.
  // `auto w = body->write(...).attach(kj::mv(body)); auto r = response.wait(ws); ... w.wait(ws)`.
  // kj-http's write queue runs eagerly, so all 5 bytes reach the server, which answers. A write
  // is counted when it ends, not when its promise is waited on: the fetcher is IDLE after the
  // response body's end (a clean exchange), the pool reuses the connection, no drop is counted.
  {
    test::FetcherEnv env(true);
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/w", env.headers(), uint64_t(5));
    auto write = req.body->write("hello", 5).attach(kj::mv(req.body));
    auto request = env.peer->readRequest();
    KJ_EXPECT(request.endsWith("\r\n\r\nhello"), request);
    auto written = env.peer->sendLater(OK_HELLO);
    auto r = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
    env.bounded(kj::mv(written));
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, "a clean exchange's connection was dropped",
        env.why());
    KJ_EXPECT(test::failureIfAny(env, kj::mv(write)) == nullptr);
  }
  {
    ConnectionPool::Settings settings;
    settings.maxReplayBodyBytes = 0;
    PoolEnv env(kj::mv(settings));
    auto req = env.pool->request(kj::HttpMethod::POST, "/w", env.headers(), uint64_t(5));
    auto response = req.response.eagerlyEvaluate(nullptr);
    auto peer = env.accept();
    auto write = req.body->write("hello", 5).attach(kj::mv(req.body));
    auto request = peer->readRequest();
    KJ_EXPECT(request.endsWith("\r\n\r\nhello"), request);
    auto written = peer->sendLater(OK_HELLO);
    auto r = env.bounded(kj::mv(response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
    env.bounded(kj::mv(written));
    KJ_EXPECT(test::failureIfAny(env, kj::mv(write)) == nullptr);
    env.settle();
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.droppedRequestIncomplete == 0, "a clean exchange's connection was dropped",
        s.droppedRequestIncomplete);
    KJ_EXPECT(env.pool->getIdleCount() == 1, env.pool->getIdleCount());
  }
}

KJ_TEST("a fixed-length POST whose every byte reached the server (its write promise not yet "
    "waited on) and whose body is then dropped is not said to be \"never sent in full\"") {
  // Contract: an error says what happened; "never sent in full" tells the caller the server did
  // not get the request, which for a POST invites sending it again (a duplicate). Here the
  // caller writes all 5 bytes, lets the event loop run (kj-http's write queue sends them; the
  // server reads the whole request), then drops the body and waits for the response.
  // The server's answer is delivered (the request was complete), or at least the error does not
  // claim the request was not sent in full.
  test::FetcherEnv env(true);
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/pay", env.headers(), uint64_t(5));
  auto write = req.body->write("hello", 5);
  auto request = env.peer->readRequest();
  KJ_EXPECT(request.endsWith("\r\n\r\nhello"), "the server did not get the whole request",
      request);
  auto written = env.peer->sendLater(OK_HELLO);
  req.body = nullptr;
  auto outcome = test::failureIfAny(env, req.response.then([](kj::HttpClient::Response&& r) {
    auto& body = *r.body;
    return body.readAllText().attach(kj::mv(r.body)).ignoreResult();
  }));
  KJ_IF_SOME(e, outcome) {
    KJ_EXPECT(!contains(e.getDescription(), "never sent in full"),
        "the caller is told the request was not sent, though the server got all of it and "
        "answered", e.getDescription());
  }
  write = nullptr;  // (never waited on: see the cases below for what that does)
}

// =================================================================================================
// A write still pending (its promise kept) when the body is dropped. Each scenario runs in a child
// process with freed memory overwritten (glibc's M_PERTURB), so that a use after free crashes the
// child (or ASan stops it) without ending the suite; the case checks that the child exited cleanly.

void fillFreeCache() {
  // Fills glibc's per-thread cache of freed blocks of the sizes a body stream has, so that the
  // next such block freed is perturbed (M_PERTURB does not touch blocks kept in that cache).
  for (size_t size: {72, 80, 88, 96, 104, 112, 120}) {
    void* blocks[8];
    for (auto& b: blocks) b = malloc(size);
    for (auto& b: blocks) free(b);
  }
}

bool exitsCleanlyInChild(kj::Function<void()> scenario) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  KJ_ASSERT(pid >= 0, "fork() failed");
  if (pid == 0) {
    mallopt(M_PERTURB, 0xa5);
    auto failure = kj::runCatchingExceptions([&]() { scenario(); });
    KJ_IF_SOME(e, failure) {
      auto text = kj::str(e);
      fprintf(stderr, "child: the scenario threw: %s\n", text.cStr());
    }
    fflush(stdout);
    fflush(stderr);
    _exit(failure == nullptr ? 0 : 3);
  }
  int status = 0;
  KJ_SYSCALL(waitpid(pid, &status, 0));
  KJ_EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0,
      "the scenario crashed or failed in the child process (a use after free, see its output)",
      WIFEXITED(status) ? WEXITSTATUS(status) : -1, WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

KJ_TEST("ConnectionPool (streamed body): a write whose promise the caller keeps while it drops "
    "the body settles without touching the freed body") {
  // Contract: the pool lets a body write's promise outlive the body stream ("the caller's promise
  // keeps the attempt, in case the body stream is dropped before it", pool.c++
  // Attempt::writeStreaming()), and anything destroyed in any order is memory-safe. Here the
  // caller writes all 5 declared bytes, drops the body before the write finished (legal: the
  // request then fails, as documented), and waits for the write.
  // The write's promise settles and the response fails FAILED saying the request was never sent
  // in full; nothing freed is read (the write's bookkeeping holds the exchange, not the body
  // stream). Run in a child with freed memory perturbed, so that a read of it crashes there.
  exitsCleanlyInChild([]() {
    ConnectionPool::Settings settings;
    settings.maxReplayBodyBytes = 0;
    PoolEnv env(kj::mv(settings));
    auto req = env.pool->request(kj::HttpMethod::POST, "/w", env.headers(), uint64_t(5));
    auto response = req.response.eagerlyEvaluate([](kj::Exception&& e) {
      KJ_EXPECT(contains(e.getDescription(), "never sent in full"), e);
      return kj::HttpClient::Response();
    });
    auto peer = env.accept();
    auto head = peer->readHead();
    KJ_EXPECT(head.startsWith("POST /w HTTP/1.1\r\n"), head);
    auto write = req.body->write("hello", 5);
    fillFreeCache();
    req.body = nullptr;
    KJ_EXPECT(test::failureIfAny(env, kj::mv(write)) != nullptr);  // the use after free
    env.bounded(kj::mv(response));
    KJ_EXPECT(env.drainsToEnd(*peer));
  });
}

KJ_TEST("StreamFetcher: a write whose promise the caller keeps while it drops the body settles "
    "without touching the freed body") {
  // Contract: the guard is RAII; the request body, the response promise and anything else may be
  // destroyed in any order, memory-safely. Same misuse as above, on a StreamFetcher directly.
  // The write's promise settles (failed) and the response fails FAILED "never sent in full";
  // nothing freed is read.
  exitsCleanlyInChild([]() {
    test::FetcherEnv env(true);
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/w", env.headers(), uint64_t(5));
    auto write = req.body->write("hello", 5);
    fillFreeCache();
    req.body = nullptr;
    KJ_EXPECT(test::failureIfAny(env, kj::mv(write)) != nullptr);  // the use after free
    auto e = env.failureOf(kj::mv(req.response));
    KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
    KJ_EXPECT(contains(e.getDescription(), "never sent in full"), e);
    KJ_EXPECT(env.peerSawEnd(), "the connection of an incomplete request was not closed");
  });
}

}  // namespace
}  // namespace sockfetch
