// An application developer's view: every promise the public headers make (stream-fetcher.h,
// pool.h, connector.h), checked against the behaviour, with WebSockets, stats and release() first.

#include <sockfetch/connector.h>
#include <sockfetch/kj-compat.h>
#include <sockfetch/pool.h>
#include <sockfetch/stream-fetcher.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <string.h>

namespace sockfetch {
namespace {

using test::contains;
using test::Peer;

kj::String keyOf(kj::StringPtr head) {
  auto start = strstr(head.cStr(), "Sec-WebSocket-Key: ");
  KJ_ASSERT(start != nullptr, head);
  start += strlen("Sec-WebSocket-Key: ");
  return kj::heapString(start, strchr(start, '\r') - start);
}

kj::String switching(kj::StringPtr head) {
  return kj::str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
      "Sec-WebSocket-Accept: ", test::webSocketAccept(keyOf(head)), "\r\n\r\n");
}

kj::String textFrame(kj::StringPtr text) {
  // An unmasked (server) text frame, for payloads under 126 bytes.
  KJ_ASSERT(text.size() < 126);
  return kj::str("\x81", static_cast<char>(text.size()), text);
}

struct Counting final: public StreamFetcher::Observer {
  unsigned idle = 0;
  unsigned closed = 0;
  void fetcherIdle(StreamFetcher&) override { ++idle; }
  void fetcherClosed(StreamFetcher&) override { ++closed; }
};

struct FetcherEnv: public test::LoopEnv {
  // One loopback TCP connection: a StreamFetcher on the client end, a scripted peer on the other.
  kj::Own<StreamFetcher> fetcher;
  kj::Own<Peer> peer;
  Counting observer;

  explicit FetcherEnv(StreamFetcher::Settings settings = {}) {
    auto t = test::tcpTransport(io);
    if (settings.timer == nullptr) settings.timer = timer;
    fetcher = kj::heap<StreamFetcher>(kj::mv(t.client), table, kj::mv(settings));
    fetcher->setObserver(observer);
    peer = kj::heap<Peer>(ws, kj::mv(t.server));
  }
  ~FetcherEnv() noexcept(false) {
    if (fetcher.get() != nullptr) fetcher->setObserver(nullptr);
  }

  kj::String roundTrip(kj::StringPtr path, kj::StringPtr answer) {
    auto h = headers();
    auto req = fetcher->request(kj::HttpMethod::GET, path, h);
    req.body = nullptr;
    auto request = peer->readRequest();
    KJ_EXPECT(request.startsWith(kj::str("GET ", path, " ")), request);
    auto sending = peer->sendLater(answer);
    auto response = bounded(kj::mv(req.response));
    auto text = bounded(response.body->readAllText());
    bounded(kj::mv(sending));
    return text;
  }
};

constexpr kj::StringPtr OK = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"_kj;

// =================================================================================================
// StreamFetcher and WebSockets

KJ_TEST("fetcher WebSocket: a 101 with a frame in the same segment, messages both ways, then a "
        "close handshake; the observer hears of the upgrade once") {
  FetcherEnv env;
  auto h = env.headers();
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  auto head = env.peer->readHead();
  env.peer->send(kj::str(switching(head), textFrame("first")));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto first = env.bounded(socket.receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(first.tryGet<kj::String>()) == "first");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UPGRADED);
  KJ_EXPECT(env.observer.closed == 1 && env.observer.idle == 0, env.observer.closed);
  // Client to server: a masked frame (2 + 4 + 5 bytes).
  auto sending = socket.send("hello"_kj);
  KJ_EXPECT(env.peer->readExactly(11).size() == 11);
  env.bounded(kj::mv(sending));
  // Server closes; the client answers with its own close frame (2 + 4 + 2).
  env.peer->send("\x88\x02\x03\xe8"_kj);
  auto closing = env.bounded(socket.receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(closing.tryGet<kj::WebSocket::Close>()).code == 1000);
  auto replying = socket.close(1000, "");
  KJ_EXPECT(env.peer->readExactly(8).size() == 8);
  env.bounded(kj::mv(replying));
  // request() afterwards: DISCONNECTED, saying the connection was upgraded.
  KJ_EXPECT_THROW_RECOVERABLE_MESSAGE("upgraded", env.fetcher->request(kj::HttpMethod::GET, "/",
      h));
  KJ_EXPECT(env.observer.closed == 1, env.observer.closed);
}

KJ_TEST("fetcher WebSocket: a handshake refused with 400 and a body: the body is readable, the "
        "connection is reused, the observer hears fetcherIdle once") {
  FetcherEnv env;
  auto h = env.headers();
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  env.peer->readHead();
  env.peer->send("HTTP/1.1 400 Bad Request\r\nContent-Length: 7\r\n\r\nrefused");
  auto response = env.bounded(kj::mv(handshake));
  KJ_EXPECT(response.statusCode == 400);
  KJ_EXPECT(response.statusText == "Bad Request", response.statusText);
  {
    auto body = kj::mv(KJ_ASSERT_NONNULL(
        response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>()));
    KJ_EXPECT(env.bounded(body->readAllText()) == "refused");
  }
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE,
      env.fetcher->getCloseReason().orDefault(""));
  KJ_EXPECT(env.observer.idle == 1 && env.observer.closed == 0);
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 1);
  KJ_EXPECT(env.roundTrip("/next", OK) == "ok");
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 2);
}

KJ_TEST("fetcher WebSocket: a handshake refused with 200 chunked (with trailers) is reused") {
  FetcherEnv env;
  auto h = env.headers();
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  env.peer->readHead();
  env.peer->send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
      "4\r\nnope\r\n0\r\nX-T: 1\r\n\r\n");
  auto response = env.bounded(kj::mv(handshake));
  KJ_EXPECT(response.statusCode == 200);
  {
    auto body = kj::mv(KJ_ASSERT_NONNULL(
        response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>()));
    KJ_EXPECT(env.bounded(body->readAllText()) == "nope");
  }
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE,
      env.fetcher->getCloseReason().orDefault(""));
  KJ_EXPECT(env.roundTrip("/next", OK) == "ok");
}

KJ_TEST("fetcher: a plain request() answered with 101 gives the caller the 101 and the raw "
        "bytes as its body; the fetcher is CLOSED (upgraded), observer told once") {
  FetcherEnv env;
  auto h = env.headers();
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", h);
  req.body = nullptr;
  env.peer->readRequest();
  env.peer->send("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"
      "RAW");
  auto response = env.bounded(kj::mv(req.response));
  KJ_EXPECT(response.statusCode == 101);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UPGRADED);
  KJ_EXPECT(env.observer.closed == 1 && env.observer.idle == 0);
  char buffer[3];
  KJ_EXPECT(env.bounded(response.body->tryRead(buffer, 3, 3)) == 3);
  KJ_EXPECT(kj::heapString(buffer, 3) == "RAW");
  env.peer->close();
  KJ_EXPECT(env.bounded(response.body->tryRead(buffer, 1, 3)) == 0);
  KJ_EXPECT(env.observer.closed == 1);
}

KJ_TEST("fetcher: Settings::entropySource makes the WebSocket key") {
  struct Zeros final: public kj::EntropySource {
    unsigned calls = 0;
    void generate(kj::ArrayPtr<kj::byte> buffer) override {
      ++calls;
      memset(buffer.begin(), 0, buffer.size());
    }
  } zeros;
  StreamFetcher::Settings settings;
  settings.entropySource = zeros;
  FetcherEnv env(kj::mv(settings));
  auto h = env.headers();
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  auto head = env.peer->readHead();
  KJ_EXPECT(keyOf(head) == "AAAAAAAAAAAAAAAAAAAAAA==", head);
  KJ_EXPECT(zeros.calls >= 1);
}

KJ_TEST("fetcher observer: fetcherIdle may start the next request from within the callback") {
  FetcherEnv env;
  struct Next final: public StreamFetcher::Observer {
    FetcherEnv& env;
    kj::Maybe<kj::HttpClient::Request> next;
    unsigned idle = 0;
    explicit Next(FetcherEnv& env): env(env) {}
    void fetcherIdle(StreamFetcher& f) override {
      if (idle++ == 0) {
        auto h = env.headers();
        auto req = f.request(kj::HttpMethod::GET, "/second", h);
        req.body = nullptr;
        next = kj::mv(req);
      }
    }
    void fetcherClosed(StreamFetcher&) override {}
  } observer(env);
  env.fetcher->setObserver(observer);
  KJ_EXPECT(env.roundTrip("/first", OK) == "ok");
  auto req = kj::mv(KJ_ASSERT_NONNULL(observer.next));
  auto request = env.peer->readRequest();
  KJ_EXPECT(request.startsWith("GET /second "), request);
  env.peer->send("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo");
  auto response = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(response.body->readAllText()) == "two");
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 2);
  env.fetcher->setObserver(nullptr);
}

KJ_TEST("fetcher WebSocket: a handshake refused with 204: the fetcher is idle, the body empty") {
  FetcherEnv env;
  auto h = env.headers();
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  env.peer->readHead();
  env.peer->send("HTTP/1.1 204 No Content\r\n\r\n");
  auto response = env.bounded(kj::mv(handshake));
  KJ_EXPECT(response.statusCode == 204);
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  KJ_EXPECT(env.observer.idle == 1);
  {
    auto body = kj::mv(KJ_ASSERT_NONNULL(
        response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>()));
    KJ_EXPECT(env.bounded(body->readAllText()) == "");
  }
  KJ_EXPECT(env.roundTrip("/next", OK) == "ok");
}

KJ_TEST("fetcher WebSocket: a 101 then the server closing ends the WebSocket with DISCONNECTED; "
        "no hang") {
  FetcherEnv env;
  auto h = env.headers();
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  auto head = env.peer->readHead();
  env.peer->send(switching(head));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  env.peer->close();
  auto e = env.failureOf(socket.receive());
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
}

KJ_TEST("fetcher: a stream released by one fetcher and given to another: bytes the server sends "
        "idle are unsolicited, and not 'the server spoke first'") {
  FetcherEnv env;
  KJ_EXPECT(env.roundTrip("/", OK) == "ok");
  auto released = env.fetcher->release();
  StreamFetcher second(kj::mv(released), env.table);
  env.peer->send("junk");
  env.waitFor([&]() { return second.getState() == StreamFetcher::State::CLOSED; });
  KJ_EXPECT(second.getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES);
  KJ_EXPECT(!second.serverSpokeFirst());
}

kj::String binaryFrame(size_t size, char fill) {
  // An unmasked (server) binary frame with a 64-bit length.
  kj::Vector<char> out;
  out.add('\x82');
  out.add(127);
  for (int i = 7; i >= 0; i--) out.add(static_cast<char>((uint64_t(size) >> (8 * i)) & 0xff));
  for (size_t i = 0; i < size; i++) out.add(fill);
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

KJ_TEST("fetcher WebSocket: a large frame in the same write as the 101, then another, both "
        "arrive whole; a large message from the client reaches the server whole") {
  FetcherEnv env;
  auto h = env.headers();
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  auto head = env.peer->readHead();
  constexpr size_t BIG = 200000;
  auto first = kj::str(switching(head), binaryFrame(BIG, 'a'));
  auto second = binaryFrame(BIG, 'b');
  auto sending = env.peer->sendLater(first).then([&]() { return env.peer->sendLater(second); })
      .eagerlyEvaluate(nullptr);
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  for (char fill: {'a', 'b'}) {
    KJ_CONTEXT(fill);
    auto m = env.bounded(socket.receive());
    auto& bytes = KJ_ASSERT_NONNULL(m.tryGet<kj::Array<kj::byte>>());
    KJ_EXPECT(bytes.size() == BIG, bytes.size());
    bool same = true;
    for (auto b: bytes) same = same && b == kj::byte(fill);
    KJ_EXPECT(same);
  }
  env.bounded(kj::mv(sending));
  auto payload = kj::heapArray<kj::byte>(BIG);
  memset(payload.begin(), 'c', BIG);
  auto out = socket.send(payload.asPtr()).eagerlyEvaluate(nullptr);
  // Masked client frame: 2 + 8 + 4 + BIG.
  KJ_EXPECT(env.peer->readExactly(2 + 8 + 4 + BIG).size() == 2 + 8 + 4 + BIG);
  env.bounded(kj::mv(out));
}

KJ_TEST("fetcher: a large Content-Length body in the same write as its head, then a reuse") {
  FetcherEnv env;
  constexpr size_t BIG = 300000;
  auto body = kj::heapString(BIG);
  memset(body.begin(), 'x', BIG);
  auto answer = kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", BIG, "\r\n\r\n", body);
  auto text = env.roundTrip("/big", answer);
  KJ_EXPECT(text.size() == BIG, text.size());
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  KJ_EXPECT(env.roundTrip("/next", OK) == "ok");
}

KJ_TEST("fetcher observer: a request body dropped short while its response is being read: CLOSED "
        "at once, fetcherClosed only when the response is over; the pool counts it till then") {
  FetcherEnv env;
  auto h = env.headers();
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/up", h, uint64_t(10));
  env.bounded(req.body->write("abc", 3));
  auto head = env.peer->readHead();
  env.peer->send("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc");
  auto response = env.bounded(kj::mv(req.response));
  char buffer[3];
  KJ_EXPECT(env.bounded(response.body->tryRead(buffer, 3, 3)) == 3);
  req.body = nullptr;  // 3 of 10 bytes
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::ABANDONED,
      env.fetcher->getCloseKind());
  KJ_EXPECT(env.observer.closed == 0, "told before the response was over");
  env.peer->send("def");
  KJ_EXPECT(env.bounded(response.body->tryRead(buffer, 3, 3)) == 3);
  KJ_EXPECT(kj::heapString(buffer, 3) == "def");
  env.settle();
  KJ_EXPECT(env.observer.closed == 1, "not told once the response was over");
  response.body = nullptr;
  KJ_EXPECT(env.observer.closed == 1);
}

// When an exchange fails while its request body is still being written, the body's writes are
// refused with this request's failure, not with the fetcher's close reason (which is worded for
// the next request: "the previous request failed"), and with that failure's one piece of advice.
KJ_TEST("a request body written after its own exchange failed is refused with that request's "
        "failure, and one piece of advice") {
  FetcherEnv env;
  auto h = env.headers();
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/up", h, uint64_t(10));
  auto response = req.response.eagerlyEvaluate(nullptr);
  env.peer->readHead();
  test::resetConnection(*env.peer);
  auto failed = env.failureOf(kj::mv(response));
  KJ_EXPECT(failed.getType() == kj::Exception::Type::DISCONNECTED, failed);
  auto e = KJ_ASSERT_NONNULL(test::failureIfAny(env, req.body->write("abcde", 5)),
      "a write after the exchange failed succeeded");
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(!contains(e.getDescription(), "previous request"),
      "the failure of this very request is called the previous request's", e);
  KJ_EXPECT(contains(e.getDescription(), "this request failed, so the rest of its body cannot be "
      "sent: the connection failed while the response was read"), e);
  KJ_EXPECT(!contains(e.getDescription(), "send the request again"), e);
}

// =================================================================================================
// release()

KJ_TEST("fetcher release(): in every state; bytes sent after it (the idle read outstanding) "
        "reach the released stream, after the fetcher is gone") {
  FetcherEnv env;
  auto h = env.headers();
  KJ_EXPECT(env.roundTrip("/", OK) == "ok");
  // Let the event loop go idle, so that the idle watch's read is outstanding.
  env.settle();
  {
    auto req = env.fetcher->request(kj::HttpMethod::GET, "/busy", h);
    req.body = nullptr;
    KJ_EXPECT_THROW_RECOVERABLE_MESSAGE("idle", env.fetcher->release());
    env.peer->readRequest();
    env.peer->send(OK);
    auto response = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "ok");
  }
  env.settle();
  auto released = env.fetcher->release();
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::RELEASED);
  KJ_EXPECT(env.fetcher->getCloseReason() == nullptr);
  KJ_EXPECT(env.observer.closed == 0);
  KJ_EXPECT_THROW_RECOVERABLE_MESSAGE("already", env.fetcher->release());
  {
    auto e = KJ_ASSERT_NONNULL(kj::runCatchingExceptions([&]() {
      env.fetcher->request(kj::HttpMethod::GET, "/", h);
    }));
    KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
    KJ_EXPECT(contains(e.getDescription(), "release()"), e);
  }
  env.fetcher = nullptr;
  env.peer->send("XYZ");
  char buffer[3];
  KJ_EXPECT(env.bounded(released->tryRead(buffer, 3, 3)) == 3);
  KJ_EXPECT(kj::heapString(buffer, 3) == "XYZ");
  // And it writes.
  env.bounded(released->write("abc", 3));
  KJ_EXPECT(env.peer->readExactly(3) == "abc");
}

KJ_TEST("fetcher release() when CLOSED says why, FAILED") {
  FetcherEnv env;
  env.peer->send("HTTP/1.1 200 OK\r\n");  // unsolicited, while idle
  env.waitFor([&]() { return env.fetcher->getState() == StreamFetcher::State::CLOSED; });
  KJ_EXPECT(env.fetcher->serverSpokeFirst());
  auto e = KJ_ASSERT_NONNULL(kj::runCatchingExceptions([&]() { env.fetcher->release(); }));
  KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
  KJ_EXPECT(contains(e.getDescription(), "dropped"), e);
  KJ_EXPECT(!env.fetcher->lastExchangeWroteRequest());
  KJ_EXPECT(!env.fetcher->lastExchangeReceivedResponse());
  KJ_EXPECT(env.observer.closed == 1);
}

struct TlsLikeEnv: public test::LoopEnv {
  // A StreamFetcher over a stream that is not kj's own socket (reads ahead, reports late).
  kj::Own<StreamFetcher> fetcher;
  kj::Own<Peer> peer;
  Counting observer;

  TlsLikeEnv() {
    auto t = test::tcpTransport(io);
    StreamFetcher::Settings settings;
    settings.timer = timer;
    fetcher = kj::heap<StreamFetcher>(test::tlsLike(kj::mv(t.client)), table, kj::mv(settings));
    fetcher->setObserver(observer);
    peer = kj::heap<Peer>(ws, kj::mv(t.server));
  }
  ~TlsLikeEnv() noexcept(false) {
    if (fetcher.get() != nullptr) fetcher->setObserver(nullptr);
  }
};

KJ_TEST("fetcher over a non-socket stream: release() with the idle read outstanding; bytes "
        "after it all reach the released stream, in order") {
  TlsLikeEnv env;
  auto h = env.headers();
  {
    auto req = env.fetcher->request(kj::HttpMethod::GET, "/", h);
    req.body = nullptr;
    env.peer->readRequest();
    env.peer->send(OK);
    auto response = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "ok");
  }
  env.settle();
  KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  auto released = env.fetcher->release();
  env.fetcher = nullptr;
  env.peer->send("HELLO");
  char buffer[5];
  size_t got = 0;
  while (got < 5) {
    size_t n = env.bounded(released->tryRead(buffer + got, 1, 5 - got));
    KJ_ASSERT(n > 0, got);
    got += n;
  }
  KJ_EXPECT(kj::heapString(buffer, 5) == "HELLO");
  env.bounded(released->write("abc", 3));
  KJ_EXPECT(env.peer->readExactly(3) == "abc");
  env.peer->close();
  KJ_EXPECT(env.bounded(released->tryRead(buffer, 1, 5)) == 0);
}

KJ_TEST("fetcher over a non-socket stream: a WebSocket after an exchange (the idle read adopted), "
        "frames behind the 101 reach it") {
  TlsLikeEnv env;
  auto h = env.headers();
  {
    auto req = env.fetcher->request(kj::HttpMethod::GET, "/", h);
    req.body = nullptr;
    env.peer->readRequest();
    env.peer->send(OK);
    auto response = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "ok");
  }
  env.settle();
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  auto head = env.peer->readHead();
  env.peer->send(kj::str(switching(head), textFrame("one"), textFrame("two")));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto m1 = env.bounded(socket.receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(m1.tryGet<kj::String>()) == "one");
  auto m2 = env.bounded(socket.receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(m2.tryGet<kj::String>()) == "two");
  KJ_EXPECT(env.observer.idle == 1 && env.observer.closed == 1);
}

KJ_TEST("fetcher observer: the server closing the idle connection is told once; request() then "
        "fails DISCONNECTED at once, writing nothing, and is safe to retry") {
  FetcherEnv env;
  KJ_EXPECT(env.roundTrip("/", OK) == "ok");
  env.peer->close();
  env.waitFor([&]() { return env.fetcher->getState() == StreamFetcher::State::CLOSED; });
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::PEER_CLOSED_IDLE,
      env.fetcher->getCloseKind());
  KJ_EXPECT(env.observer.closed == 1 && env.observer.idle == 1);
  auto h = env.headers();
  auto e = KJ_ASSERT_NONNULL(kj::runCatchingExceptions([&]() {
    env.fetcher->request(kj::HttpMethod::GET, "/", h);
  }));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(!env.fetcher->serverSpokeFirst());
  KJ_EXPECT(env.observer.closed == 1);
}

// =================================================================================================
// ConnectionPool over loopback TCP

struct PoolEnv: public test::LoopEnv {
  kj::Own<kj::ConnectionReceiver> listener;
  kj::Own<kj::NetworkAddress> address;
  kj::Own<ConnectionPool> pool;

  explicit PoolEnv(ConnectionPool::Settings settings = {}) {
    auto& network = io.provider->getNetwork();
    listener = network.parseAddress("127.0.0.1", 0).wait(ws)->listen();
    address = network.parseAddress("127.0.0.1", listener->getPort()).wait(ws);
    pool = kj::heap<ConnectionPool>(timer, table, *address, kj::mv(settings));
  }

  kj::Own<Peer> accept() {
    return kj::heap<Peer>(ws, bounded(listener->accept()));
  }

  bool acceptsWithin(kj::Duration d) {
    return listener->accept().then([](auto) { return true; })
        .exclusiveJoin(timer.afterDelay(d).then([]() { return false; })).wait(ws);
  }

  kj::HttpClient::Request get(kj::StringPtr path) {
    auto h = headers();
    auto req = pool->request(kj::HttpMethod::GET, path, h);
    req.body = nullptr;
    req.response = req.response.eagerlyEvaluate(nullptr);
    return req;
  }

  kj::String serve(Peer& peer, kj::HttpClient::Request req, kj::StringPtr answer = OK) {
    peer.readRequest();
    auto sending = peer.sendLater(answer);
    auto response = bounded(kj::mv(req.response));
    auto text = bounded(response.body->readAllText());
    bounded(kj::mv(sending));
    return text;
  }

  kj::String stats() {
    auto& s = pool->getStats();
    return kj::str("opened=", s.connectionsOpened, " connectFailures=", s.connectFailures,
        " requests=", s.requests, " reuses=", s.reuses, " retries=", s.retries, " waits=",
        s.waits, " overloaded=", s.overloaded, " dropped=", s.dropped(), " open=",
        pool->getOpenCount(), " idle=", pool->getIdleCount());
  }
};

ConnectionPool::Settings withMax(unsigned n) {
  ConnectionPool::Settings s;
  s.maxConnections = n;
  return s;
}

KJ_TEST("pool WebSocket: an upgrade frees its slot at once (maxConnections 1): a request "
        "waiting for it is served on a new connection; stats exact") {
  PoolEnv env(withMax(1));
  auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  auto upstream = env.accept();
  auto head = upstream->readHead();
  auto waiting = env.get("/waiting");
  env.settle();
  KJ_EXPECT(env.pool->getWaitingCount() == 1, env.stats());
  upstream->send(kj::str(switching(head), textFrame("hi")));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto message = env.bounded(socket.receive());
  KJ_IF_SOME(close, message.tryGet<kj::WebSocket::Close>()) {
    KJ_FAIL_EXPECT("got a close", close.code, close.reason);
  }
  KJ_EXPECT(KJ_ASSERT_NONNULL(message.tryGet<kj::String>()) == "hi");
  auto second = env.accept();
  KJ_EXPECT(env.serve(*second, kj::mv(waiting)) == "ok");
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.requests == 2 && s.connectionsOpened == 2 && s.waits == 1 && s.reuses == 0 &&
      s.droppedUpgraded == 1 && s.dropped() == 1 && s.overloaded == 0, env.stats());
  KJ_EXPECT(env.pool->getOpenCount() == 1 && env.pool->getIdleCount() == 1, env.stats());
  // The WebSocket still works after all that.
  auto sending = socket.send("yo"_kj);
  KJ_EXPECT(upstream->readExactly(8).size() == 8);
  env.bounded(kj::mv(sending));
}

KJ_TEST("pool WebSocket: a handshake refused with 400 and a body: body readable, connection "
        "reused, stats exact") {
  PoolEnv env;
  auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  auto upstream = env.accept();
  upstream->readHead();
  upstream->send("HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nno!");
  auto response = env.bounded(kj::mv(handshake));
  KJ_EXPECT(response.statusCode == 400);
  {
    auto body = kj::mv(KJ_ASSERT_NONNULL(
        response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>()));
    KJ_EXPECT(env.bounded(body->readAllText()) == "no!");
  }
  KJ_EXPECT(env.pool->getIdleCount() == 1, env.stats());
  KJ_EXPECT(env.serve(*upstream, env.get("/next")) == "ok");
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.requests == 2 && s.connectionsOpened == 1 && s.reuses == 1 && s.dropped() == 0,
      env.stats());
}

KJ_TEST("pool stats: maxWaiting 0 refuses at once (OVERLOADED), counted as overloaded and not "
        "as a wait") {
  auto settings = withMax(1);
  settings.maxWaiting = 0;
  PoolEnv env(kj::mv(settings));
  auto busy = env.get("/busy");
  auto upstream = env.accept();
  auto refused = env.get("/refused");
  auto e = env.failureOf(kj::mv(refused.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::OVERLOADED, e);
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.overloaded == 1 && s.waits == 0 && s.requests == 2, env.stats());
  KJ_EXPECT(env.serve(*upstream, kj::mv(busy)) == "ok");
}

KJ_TEST("pool stats: a wait that times out is OVERLOADED, counted once as a wait and once as "
        "overloaded") {
  auto settings = withMax(1);
  settings.waitTimeout = 50 * kj::MILLISECONDS;
  PoolEnv env(kj::mv(settings));
  auto busy = env.get("/busy");
  auto upstream = env.accept();
  auto waiting = env.get("/waiting");
  auto e = env.failureOf(kj::mv(waiting.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::OVERLOADED, e);
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.overloaded == 1 && s.waits == 1, env.stats());
  KJ_EXPECT(env.pool->getWaitingCount() == 0, env.stats());
  KJ_EXPECT(env.serve(*upstream, kj::mv(busy)) == "ok");
}

KJ_TEST("pool stats: connectTimeout fails OVERLOADED and counts a connect failure") {
  ConnectionPool::Settings settings;
  settings.connectTimeout = 50 * kj::MILLISECONDS;
  test::LoopEnv env;
  unsigned calls = 0;
  ConnectionPool pool(env.timer, env.table, [&]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    ++calls;
    return kj::NEVER_DONE;
  }, kj::mv(settings));
  auto h = env.headers();
  auto req = pool.request(kj::HttpMethod::GET, "/", h);
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::OVERLOADED, e);
  KJ_EXPECT(contains(e.getDescription(), "connectTimeout"), e);
  auto& s = pool.getStats();
  KJ_EXPECT(s.connectFailures == 1 && s.connectionsOpened == 0 && calls == 1, s.connectFailures);
  KJ_EXPECT(pool.getOpenCount() == 0);
}

KJ_TEST("pool stats: a refused connect names the address, DISCONNECTED, one connect failure") {
  test::LoopEnv env;
  auto& network = env.io.provider->getNetwork();
  kj::Own<kj::NetworkAddress> address;
  {
    auto listener = network.parseAddress("127.0.0.1", 0).wait(env.ws)->listen();
    address = network.parseAddress("127.0.0.1", listener->getPort()).wait(env.ws);
  }
  ConnectionPool pool(env.timer, env.table, *address);
  auto h = env.headers();
  auto req = pool.request(kj::HttpMethod::GET, "/", h);
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), address->toString()), e);
  KJ_EXPECT(pool.getStats().connectFailures == 1);
  KJ_EXPECT(pool.getOpenCount() == 0);
}

KJ_TEST("pool stats: idleTimeout, maxRequestsPerConnection, neverReuse, maxIdleConnections each "
        "count exactly one drop") {
  {
    ConnectionPool::Settings settings;
    settings.idleTimeout = 50 * kj::MILLISECONDS;
    PoolEnv env(kj::mv(settings));
    auto req = env.get("/");
    auto upstream = env.accept();
    KJ_EXPECT(env.serve(*upstream, kj::mv(req)) == "ok");
    KJ_EXPECT(env.pool->getIdleCount() == 1);
    env.waitFor([&]() { return env.pool->getIdleCount() == 0; });
    KJ_EXPECT(env.pool->getStats().droppedIdleTimeout == 1 &&
        env.pool->getStats().dropped() == 1, env.stats());
    KJ_EXPECT(upstream->sawEof());
  }
  {
    ConnectionPool::Settings settings;
    settings.maxRequestsPerConnection = 2;
    PoolEnv env(kj::mv(settings));
    auto req = env.get("/1");
    auto upstream = env.accept();
    KJ_EXPECT(env.serve(*upstream, kj::mv(req)) == "ok");
    KJ_EXPECT(env.serve(*upstream, env.get("/2")) == "ok");
    KJ_EXPECT(upstream->sawEof(), "a connection that served 2 requests stayed open");
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.droppedMaxRequests == 1 && s.dropped() == 1 && s.reuses == 1, env.stats());
    KJ_EXPECT(env.pool->getOpenCount() == 0, env.stats());
  }
  {
    ConnectionPool::Settings settings;
    settings.neverReuse = true;
    PoolEnv env(kj::mv(settings));
    auto req = env.get("/1");
    auto upstream = env.accept();
    KJ_EXPECT(env.serve(*upstream, kj::mv(req)) == "ok");
    KJ_EXPECT(upstream->sawEof());
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.droppedNeverReuse == 1 && s.dropped() == 1, env.stats());
  }
  {
    ConnectionPool::Settings settings;
    settings.maxIdleConnections = 1;
    PoolEnv env(kj::mv(settings));
    auto a = env.get("/a");
    auto upA = env.accept();
    auto b = env.get("/b");
    auto upB = env.accept();
    KJ_EXPECT(env.serve(*upA, kj::mv(a)) == "ok");
    KJ_EXPECT(env.serve(*upB, kj::mv(b)) == "ok");
    env.settle();
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.droppedIdleLimit == 1 && s.dropped() == 1, env.stats());
    KJ_EXPECT(env.pool->getIdleCount() == 1 && env.pool->getOpenCount() == 1, env.stats());
    KJ_EXPECT(upB->sawEof());
  }
}

KJ_TEST("pool stats: each close reason of an exchange counts under its own name") {
  struct Case {
    kj::StringPtr answer;
    uint64_t ConnectionPool::Stats::*counter;
    kj::StringPtr name;
  };
  Case cases[] = {
    {"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"_kj,
        &ConnectionPool::Stats::droppedConnectionClose, "Connection: close"_kj},
    {"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"_kj,
        &ConnectionPool::Stats::droppedNotReusable, "HTTP/1.0"_kj},
    {"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"_kj,
        &ConnectionPool::Stats::droppedUnsolicitedBytes, "bytes past the end"_kj},
  };
  for (auto& c: cases) {
    KJ_CONTEXT(c.name);
    PoolEnv env;
    auto req = env.get("/");
    auto upstream = env.accept();
    KJ_EXPECT(env.serve(*upstream, kj::mv(req), c.answer) == "ok");
    env.settle();
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.*c.counter == 1 && s.dropped() == 1, env.stats());
    KJ_EXPECT(env.pool->getOpenCount() == 0, env.stats());
  }
  {
    // The server closes an idle connection.
    PoolEnv env;
    auto req = env.get("/");
    auto upstream = env.accept();
    KJ_EXPECT(env.serve(*upstream, kj::mv(req)) == "ok");
    upstream->close();
    env.waitFor([&]() { return env.pool->getOpenCount() == 0; });
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.droppedPeerClosedIdle == 1 && s.dropped() == 1, env.stats());
  }
  {
    // A response body dropped early.
    PoolEnv env;
    auto req = env.get("/");
    auto upstream = env.accept();
    upstream->readRequest();
    upstream->send("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
    {
      auto response = env.bounded(kj::mv(req.response));
    }
    env.settle();
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.droppedAbandoned == 1 && s.dropped() == 1, env.stats());
    KJ_EXPECT(env.pool->getOpenCount() == 0, env.stats());
    KJ_EXPECT(upstream->sawEof());
  }
  {
    // The server answers before the request body was written.
    PoolEnv env;
    auto h = env.headers();
    auto req = env.pool->request(kj::HttpMethod::POST, "/up", h, uint64_t(1000000));
    auto writing = req.body->write("abc", 3).eagerlyEvaluate(nullptr);
    auto upstream = env.accept();
    upstream->readHead();
    upstream->send("HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno");
    auto response = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "no");
    env.settle();
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.droppedRequestIncomplete == 1 && s.dropped() == 1, env.stats());
  }
}

KJ_TEST("pool stats: the stale keep-alive race is retried once, counted as stale, a reuse and "
        "a retry") {
  PoolEnv env;
  auto req = env.get("/1");
  auto upstream = env.accept();
  KJ_EXPECT(env.serve(*upstream, kj::mv(req)) == "ok");
  auto again = env.get("/2");
  upstream->readRequest();
  upstream->close();  // closed as the request went out: no response byte
  auto fresh = env.accept();
  KJ_EXPECT(env.serve(*fresh, kj::mv(again)) == "ok");
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.requests == 2 && s.reuses == 1 && s.retries == 1 && s.droppedStale == 1 &&
      s.dropped() == 1 && s.connectionsOpened == 2, env.stats());
}

KJ_TEST("pool: destroying the pool fails a waiting request DISCONNECTED, naming the pool; a "
        "request already sent completes") {
  PoolEnv env(withMax(1));
  auto sent = env.get("/sent");
  auto upstream = env.accept();
  auto waiting = env.get("/waiting");
  upstream->readRequest();
  env.pool = nullptr;
  auto e = env.failureOf(kj::mv(waiting.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), "ConnectionPool was destroyed"), e);
  auto sending = upstream->sendLater(OK);
  auto response = env.bounded(kj::mv(sent.response));
  KJ_EXPECT(env.bounded(response.body->readAllText()) == "ok");
  env.bounded(kj::mv(sending));
  KJ_EXPECT(upstream->sawEof());
}

KJ_TEST("pool WebSocket: a handshake on a reused connection the server closed as it went out is "
        "sent again on a new one; stats exact") {
  PoolEnv env;
  auto req = env.get("/1");
  auto upstream = env.accept();
  KJ_EXPECT(env.serve(*upstream, kj::mv(req)) == "ok");
  auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  upstream->readHead();
  upstream->close();
  auto fresh = env.accept();
  auto head = fresh->readHead();
  fresh->send(kj::str(switching(head), textFrame("hi")));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto m = env.bounded(socket.receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(m.tryGet<kj::String>()) == "hi");
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.requests == 2 && s.reuses == 1 && s.retries == 1 && s.droppedStale == 1 &&
      s.droppedUpgraded == 1 && s.dropped() == 2 && s.connectionsOpened == 2, env.stats());
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.stats());
}

KJ_TEST("pool WebSocket: the pool destroyed during the handshake; the 101 still gives a working "
        "WebSocket, whose socket closes when it is dropped") {
  PoolEnv env;
  auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  auto upstream = env.accept();
  auto head = upstream->readHead();
  env.pool = nullptr;
  upstream->send(kj::str(switching(head), textFrame("hi")));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  {
    auto socket = kj::mv(KJ_ASSERT_NONNULL(
        response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>()));
    auto m = env.bounded(socket->receive());
    KJ_EXPECT(KJ_ASSERT_NONNULL(m.tryGet<kj::String>()) == "hi");
    auto sending = socket->send("yo"_kj);
    KJ_EXPECT(upstream->readExactly(8).size() == 8);
    env.bounded(kj::mv(sending));
  }
  response.webSocketOrBody = kj::Own<kj::AsyncInputStream>();
  KJ_EXPECT(upstream->sawEof());
}

KJ_TEST("pool: a plain request answered with 101, its body dropped at once: the socket closes, "
        "the pool counts one upgrade and holds nothing") {
  PoolEnv env;
  auto req = env.get("/");
  auto upstream = env.accept();
  upstream->readRequest();
  upstream->send(
      "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\nRAW");
  {
    auto response = env.bounded(kj::mv(req.response));
    KJ_EXPECT(response.statusCode == 101);
  }
  KJ_EXPECT(upstream->sawEof());
  env.settle();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.droppedUpgraded == 1 && s.dropped() == 1, env.stats());
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.stats());
}

// =================================================================================================
// Errors after and around WebSocket handshakes

// A WebSocket handshake the server fails (kj-http checks the 101) is said in sockfetch's words,
// not kj-http's internal ones ("protocolError.description = Server failed WebSocket handshake:
// ..."), keeping kj-http's detail and saying what to do; so is the fetcher's close reason, which
// every later request's refusal repeats.
struct BadHandshake {
  kj::StringPtr answer;
  kj::StringPtr what;
};
const BadHandshake BAD_HANDSHAKES[] = {
  {"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
      "Sec-WebSocket-Accept: wrong\r\n\r\n"_kj, "Sec-WebSocket-Accept"_kj},
  {"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"_kj,
      "Upgrade"_kj},
  {"HTTP/1.1 101 Switching Protocols\r\n\r\n"_kj, "Upgrade"_kj},
};

void expectClearHandshakeError(const kj::Exception& e, kj::StringPtr what) {
  KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
  KJ_EXPECT(contains(e.getDescription(), what), e);
  KJ_EXPECT(!contains(e.getDescription(), "protocolError.description"),
      "kj-http's internal wording reached the caller", e);
  KJ_EXPECT(contains(e.getDescription(), "the server answered the WebSocket handshake with a 101 "
      "that does not accept it ("), e);
  KJ_EXPECT(contains(e.getDescription(), "check that the upstream serves WebSockets at this url"),
      "the error does not say what to do", e);
}

KJ_TEST("a WebSocket handshake the server fails (bad Sec-WebSocket-Accept, wrong or missing "
        "Upgrade) fails FAILED in sockfetch's words, saying what to do; so does every later "
        "request on the fetcher") {
  for (auto& c: BAD_HANDSHAKES) {
    KJ_CONTEXT(c.answer);
    FetcherEnv env;
    auto h = env.headers();
    auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
    env.peer->readHead();
    env.peer->send(c.answer);
    auto e = env.failureOf(kj::mv(handshake));
    expectClearHandshakeError(e, c.what);
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::CLOSED);
    KJ_EXPECT(env.peer->sawEof(), "the failed handshake's connection stayed open");
    auto next = KJ_ASSERT_NONNULL(kj::runCatchingExceptions([&]() {
      env.fetcher->request(kj::HttpMethod::GET, "/", h);
    }));
    KJ_EXPECT(next.getType() == kj::Exception::Type::DISCONNECTED, next);
    KJ_EXPECT(!contains(next.getDescription(), "protocolError.description"),
        "kj-http's internal wording in the close reason", next);
  }
}

KJ_TEST("through a ConnectionPool too, a failed WebSocket handshake is said in sockfetch's "
        "words, with advice, and not retried") {
  for (auto& c: BAD_HANDSHAKES) {
    KJ_CONTEXT(c.answer);
    PoolEnv env;
    auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
    auto upstream = env.accept();
    upstream->readHead();
    upstream->send(c.answer);
    auto e = env.failureOf(kj::mv(handshake));
    expectClearHandshakeError(e, c.what);
    env.settle();
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.droppedFailed == 1 && s.retries == 0 && env.pool->getOpenCount() == 0,
        env.stats());
  }
}

// After a 101, the connection is the WebSocket's: a read of it that fails (the server resets it)
// is not reported as a failed HTTP response with advice to repeat a request (there is neither),
// but as the upgraded connection failing.
KJ_TEST("a WebSocket whose server resets the connection fails its receive() DISCONNECTED as an "
        "upgraded connection that failed, not as an incomplete response") {
  FetcherEnv env;
  auto h = env.headers();
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  auto head = env.peer->readHead();
  env.peer->send(kj::str(switching(head), textFrame("hi")));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  auto m = env.bounded(socket.receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(m.tryGet<kj::String>()) == "hi");
  test::resetConnection(*env.peer);
  auto e = env.failureOf(socket.receive());
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(!contains(e.getDescription(), "the response is incomplete"),
      "a WebSocket's failure is described as an incomplete HTTP response", e);
  KJ_EXPECT(!contains(e.getDescription(), "if the request is safe to repeat"),
      "a WebSocket's failure advises repeating a request", e);
  KJ_EXPECT(contains(e.getDescription(), "the connection failed after it was upgraded to another "
      "protocol"), e);
}

KJ_TEST("through a ConnectionPool, a reset WebSocket also fails as an upgraded connection that "
        "failed") {
  PoolEnv env;
  auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  auto upstream = env.accept();
  auto head = upstream->readHead();
  upstream->send(switching(head));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  test::resetConnection(*upstream);
  auto e = env.failureOf(socket.receive());
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(!contains(e.getDescription(), "the response is incomplete") &&
      !contains(e.getDescription(), "if the request is safe to repeat"),
      "a WebSocket's failure is described as an HTTP response's", e);
}

// kj::WebSocket::abort() ("forcefully close this WebSocket") is kj-http's WebSocketImpl::abort():
// stream->abortRead() then stream->shutdownWrite(). Over kj's own socket a receive() in progress
// then fails at once (DISCONNECTED); over a fetcher's connection too: the exchange's view passes
// abortRead() on to the connection, or the receive() would wait for the server to close.
void expectAbortEndsReceive(test::LoopEnv& env, kj::WebSocket& socket, Peer& server) {
  auto receiving = socket.receive().eagerlyEvaluate(nullptr);
  env.settle();
  socket.abort();
  auto e = env.failureOf(kj::mv(receiving));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(server.sawEof(), "the server did not see the aborted WebSocket go");
}

KJ_TEST("WebSocket::abort() on a StreamFetcher's WebSocket ends a pending receive() "
        "DISCONNECTED, as over a kj socket") {
  {
    // kj's own behaviour, for comparison.
    test::LoopEnv env;
    auto t = test::tcpTransport(env.io);
    auto socket = kj::newWebSocket(kj::mv(t.client), nullptr);
    Peer server(env.ws, kj::mv(t.server));
    expectAbortEndsReceive(env, *socket, server);
  }
  FetcherEnv env;
  auto h = env.headers();
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  auto head = env.peer->readHead();
  env.peer->send(switching(head));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  expectAbortEndsReceive(env, socket, *env.peer);
}

KJ_TEST("WebSocket::abort() on a ConnectionPool's WebSocket ends a pending receive()") {
  PoolEnv env;
  auto handshake = env.pool->openWebSocket("/ws", env.headers()).eagerlyEvaluate(nullptr);
  auto upstream = env.accept();
  auto head = upstream->readHead();
  upstream->send(switching(head));
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  expectAbortEndsReceive(env, socket, *upstream);
}

// =================================================================================================
// Connectors

KJ_TEST("tunnelConnector: through a CONNECT proxy; a 503 is OVERLOADED, a 407 FAILED naming the "
        "status, a 502 DISCONNECTED") {
  struct Case {
    kj::StringPtr answer;
    kj::Exception::Type type;
    kj::StringPtr mention;
  };
  Case cases[] = {
    {"HTTP/1.1 503 Busy\r\n\r\n"_kj, kj::Exception::Type::OVERLOADED, "Busy"_kj},
    {"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"_kj,
        kj::Exception::Type::FAILED, "407"_kj},
    {"HTTP/1.1 502 Bad Gateway\r\n\r\n"_kj, kj::Exception::Type::DISCONNECTED, "Bad Gateway"_kj},
  };
  for (auto& c: cases) {
    KJ_CONTEXT(c.answer);
    test::PipeProxyEnv env;
    auto connector = tunnelConnector(env.toProxy(), "origin.test:443");
    auto tunnel = connector().eagerlyEvaluate(nullptr);
    auto& proxy = *env.proxies[0];
    auto head = proxy.readHead();
    KJ_EXPECT(head.startsWith("CONNECT origin.test:443 HTTP/1.1\r\n"), head);
    auto sending = proxy.sendLater(c.answer);
    auto e = env.failureOf(kj::mv(tunnel));
    KJ_EXPECT(e.getType() == c.type, e);
    KJ_EXPECT(contains(e.getDescription(), c.mention), e);
  }
}

KJ_TEST("tunnelConnector: a pool through a CONNECT tunnel reuses it; the bytes after the 200 "
        "are the origin's") {
  test::LoopEnv env;
  auto& network = env.io.provider->getNetwork();
  auto listener = network.parseAddress("127.0.0.1", 0).wait(env.ws)->listen();
  auto address = network.parseAddress("127.0.0.1", listener->getPort()).wait(env.ws);
  ConnectionPool pool(env.timer, env.table,
      tunnelConnector(addressConnector(*address), "origin.test:80"));
  auto h = env.headers();
  auto req = pool.request(kj::HttpMethod::GET, "/a", h);
  req.body = nullptr;
  auto response = req.response.eagerlyEvaluate(nullptr);
  Peer proxy(env.ws, env.bounded(listener->accept()));
  KJ_EXPECT(proxy.readHead().startsWith("CONNECT origin.test:80 HTTP/1.1\r\n"));
  proxy.send("HTTP/1.1 200 Connection established\r\n\r\n");
  KJ_EXPECT(proxy.readRequest().startsWith("GET /a HTTP/1.1\r\n"));
  proxy.send(OK);
  auto r = env.bounded(kj::mv(response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "ok");
  auto req2 = pool.request(kj::HttpMethod::GET, "/b", h);
  req2.body = nullptr;
  auto response2 = req2.response.eagerlyEvaluate(nullptr);
  KJ_EXPECT(proxy.readRequest().startsWith("GET /b HTTP/1.1\r\n"));
  proxy.send(OK);
  auto r2 = env.bounded(kj::mv(response2));
  KJ_EXPECT(env.bounded(r2.body->readAllText()) == "ok");
  KJ_EXPECT(pool.getStats().reuses == 1 && pool.getStats().connectionsOpened == 1);
}

KJ_TEST("addressConnector: a unix socket") {
  test::LoopEnv env;
  test::ScriptedServer server(env.io, "unix",
      [](unsigned, unsigned, kj::StringPtr) { return test::ok("unix"); });
  auto address = server.address();
  ConnectionPool pool(env.timer, env.table, *address);
  for (int i = 0; i < 2; i++) {
    auto h = env.headers();
    auto req = pool.request(kj::HttpMethod::GET, "/", h);
    req.body = nullptr;
    auto response = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "unix");
  }
  KJ_EXPECT(server.accepted == 1 && pool.getStats().reuses == 1);
}

}  // namespace
}  // namespace sockfetch
