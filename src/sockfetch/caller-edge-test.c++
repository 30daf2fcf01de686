// A well-behaved server, an adversarial caller: StreamFetcher's kj::HttpClient interface used in
// legal but unusual ways. Body reads with odd arguments (zero-length, minBytes past the end, one
// byte at a time across chunk lines and trailers), tryGetLength() at every point, pumps (limited,
// cancelled), readAllBytes() limits, re-entrant requests from read continuations and observer
// callbacks, release() at the first idle moment, bodies and headers kept across later exchanges,
// unusual request bodies, and WebSocket handshakes dropped at every point. Each case runs over an
// in-process pipe and over loopback TCP; every wait is bounded.

#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/fetcher-env.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/function.h>
#include <kj/test.h>
#include <string.h>

namespace sockfetch {
namespace {

using test::contains;
using test::header;
using test::OK_HELLO;
using Env = test::FetcherEnv;
using Kind = StreamFetcher::CloseKind;
using State = StreamFetcher::State;

#define BOTH_TRANSPORTS(name, description) \
  SOCKFETCH_TRANSPORT_PAIR(Env, name, description, "pipe", (false), "tcp", (true))
// Defines one behaviour as two KJ tests: over an in-process pipe and over loopback TCP.

class Collector final: public kj::AsyncOutputStream {
  // An output stream with no pump optimisation of its own: kj's default pump reads the body.
public:
  kj::Vector<char> bytes;

  kj::Promise<void> write(const void* buffer, size_t size) override {
    auto chars = reinterpret_cast<const char*>(buffer);
    bytes.addAll(chars, chars + size);
    return kj::READY_NOW;
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    for (auto& p: pieces) write(p.begin(), p.size());
    return kj::READY_NOW;
  }
  kj::Promise<void> whenWriteDisconnected() override {
    return kj::NEVER_DONE;
  }
  kj::String text() {
    return kj::heapString(bytes.begin(), bytes.size());
  }
};

class Observer final: public StreamFetcher::Observer {
public:
  kj::Function<void(StreamFetcher&)> onIdle = [](StreamFetcher&) {};
  kj::Function<void(StreamFetcher&)> onClosed = [](StreamFetcher&) {};
  unsigned idle = 0;
  unsigned closed = 0;

  void fetcherIdle(StreamFetcher& f) override {
    ++idle;
    onIdle(f);
  }
  void fetcherClosed(StreamFetcher& f) override {
    ++closed;
    onClosed(f);
  }
};

// =================================================================================================
// Body reads with unusual arguments

BOTH_TRANSPORTS(zeroLengthReadsAtEnd,
    "caller edge: tryRead(buf, 0, 0) after the end of fixed and bodiless bodies returns 0") {
  for (auto reply: {OK_HELLO, "HTTP/1.1 204 No Content\r\n\r\n"_kj}) {
    auto s = env.start(kj::HttpMethod::GET, "/", reply);
    auto& body = *s.response.body;
    env.bounded(body.readAllText());
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
    char buffer[4];
    KJ_EXPECT(env.read(body, buffer, 0, 0) == 0);
    env.bounded(kj::mv(s.written));
    env.roundTrip();
    KJ_EXPECT(env.read(body, buffer, 0, 0) == 0);
  }
}

BOTH_TRANSPORTS(zeroLengthReadInBody,
    "caller edge: tryRead(buf, 0, 0) inside a body reads nothing and changes nothing") {
  // kj-http 0.9.2's body readers (Content-Length and chunked) turn a zero-length read into a read
  // of (1, 0) bytes from their own buffer, get 0 and report "premature EOF". StreamFetcher's body
  // answers such a read itself: the body stays intact and the connection is kept.
  for (auto reply: {"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"_kj,
           "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"_kj}) {
    auto s = env.start(kj::HttpMethod::GET, "/", reply);
    auto& body = *s.response.body;
    char buffer[32];
    KJ_EXPECT(env.read(body, buffer, 3, 3) == 3);
    KJ_EXPECT(env.read(body, buffer, 0, 0) == 0);
    KJ_EXPECT(env.bounded(body.readAllText()) == "lo world");
    env.bounded(kj::mv(s.written));
    env.roundTrip();
  }
}

BOTH_TRANSPORTS(minBytesPastEnd,
    "caller edge: a read whose minBytes exceeds what is left returns the short count at the end") {
  for (auto reply: {"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nabcdefgh"_kj,
           "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           "3\r\nabc\r\n5\r\ndefgh\r\n0\r\nX-Trailer: t\r\n\r\n"_kj}) {
    auto s = env.start(kj::HttpMethod::GET, "/", reply);
    auto& body = *s.response.body;
    char buffer[64];
    KJ_EXPECT(env.read(body, buffer, 2, 2) == 2);
    // minBytes == maxBytes, both past the end: the short count is the end.
    KJ_EXPECT(env.read(body, buffer, 40, 40) == 6);
    KJ_EXPECT(memcmp(buffer, "cdefgh", 6) == 0);
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
    for (int i = 0; i < 3; i++) {
      KJ_EXPECT(env.read(body, buffer, 1, sizeof(buffer)) == 0);
      KJ_EXPECT(env.read(body, buffer, 40, 40) == 0);
    }
    KJ_EXPECT(KJ_ASSERT_NONNULL(body.tryGetLength()) == 0);
    env.bounded(kj::mv(s.written));
    env.roundTrip();
  }
}

BOTH_TRANSPORTS(oneByteChunked,
    "caller edge: one-byte reads across chunk lines, trailers and a late final CRLF") {
  auto s = env.start(kj::HttpMethod::GET, "/",
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
      "3\r\nabc\r\n1\r\nd\r\n2;ext=1\r\nef\r\n0\r\nX-One: 1\r\nX-Two: 2\r\n");
  auto& body = *s.response.body;
  kj::Vector<char> got;
  // The trailers' last CRLF comes only once the data has been read one byte at a time.
  for (int i = 0; i < 6; i++) {
    char c;
    KJ_ASSERT(env.read(body, &c, 1, 1) == 1, i);
    got.add(c);
  }
  KJ_EXPECT(kj::heapString(got.begin(), got.size()) == "abcdef");
  env.bounded(kj::mv(s.written));
  char c;
  auto last = body.tryRead(&c, 1, 1);
  KJ_EXPECT(!last.poll(env.ws), "the body ended before the trailers did");
  KJ_EXPECT(env.fetcher->getState() == State::BUSY, env.why());
  env.bounded(env.peer->sendLater("\r\n"));
  KJ_EXPECT(env.bounded(kj::mv(last)) == 0);
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
  KJ_EXPECT(env.read(body, &c, 1, 1) == 0);
  env.roundTrip();
}

BOTH_TRANSPORTS(lengths,
    "caller edge: tryGetLength() before, during and after fixed, chunked, bodiless and "
    "close-delimited bodies") {
  {
    auto s = env.start(kj::HttpMethod::GET, "/", "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"
        "hello world");
    auto& body = *s.response.body;
    KJ_EXPECT(KJ_ASSERT_NONNULL(body.tryGetLength()) == 11);
    char buffer[16];
    KJ_EXPECT(env.read(body, buffer, 4, 4) == 4);
    KJ_EXPECT(KJ_ASSERT_NONNULL(body.tryGetLength()) == 7);
    KJ_EXPECT(env.read(body, buffer, 7, 7) == 7);
    KJ_EXPECT(KJ_ASSERT_NONNULL(body.tryGetLength()) == 0);
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
    env.bounded(kj::mv(s.written));
    env.roundTrip();
    KJ_EXPECT(KJ_ASSERT_NONNULL(body.tryGetLength()) == 0);
  }
  {
    auto s = env.start(kj::HttpMethod::GET, "/", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
        "\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    auto& body = *s.response.body;
    KJ_EXPECT(body.tryGetLength() == nullptr);
    KJ_EXPECT(env.bounded(body.readAllText()) == "hello");
    KJ_EXPECT(KJ_ASSERT_NONNULL(body.tryGetLength()) == 0);
    env.bounded(kj::mv(s.written));
    env.roundTrip();
  }
  struct Bodiless {
    kj::HttpMethod method;
    kj::StringPtr reply;
  };
  for (auto b: {Bodiless{kj::HttpMethod::HEAD, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"},
           Bodiless{kj::HttpMethod::GET, "HTTP/1.1 204 No Content\r\n\r\n"},
           Bodiless{kj::HttpMethod::GET, "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"},
           Bodiless{kj::HttpMethod::GET, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"}}) {
    auto s = env.start(b.method, "/", b.reply);
    auto& body = *s.response.body;
    KJ_EXPECT(KJ_ASSERT_NONNULL(body.tryGetLength()) == 0, b.reply);
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
    char c;
    KJ_EXPECT(env.read(body, &c, 1, 1) == 0);
    KJ_EXPECT(KJ_ASSERT_NONNULL(body.tryGetLength()) == 0);
    env.bounded(kj::mv(s.written));
    env.roundTrip();
    KJ_EXPECT(env.read(body, &c, 1, 1) == 0);
  }
  {
    auto s = env.start(kj::HttpMethod::GET, "/", "HTTP/1.1 200 OK\r\n\r\nuntil close");
    auto& body = *s.response.body;
    KJ_EXPECT(body.tryGetLength() == nullptr);
    auto text = body.readAllText();
    env.bounded(kj::mv(s.written));
    env.peer->close();
    KJ_EXPECT(env.bounded(kj::mv(text)) == "until close");
    KJ_EXPECT(KJ_ASSERT_NONNULL(body.tryGetLength()) == 0);
    KJ_EXPECT(env.fetcher->getState() == State::CLOSED);
    KJ_EXPECT(env.fetcher->getCloseKind() == Kind::NOT_REUSABLE, env.why());
  }
}

BOTH_TRANSPORTS(bodyKeptAcrossExchanges,
    "caller edge: a finished body kept across many exchanges never yields their bytes") {
  auto first = env.start(kj::HttpMethod::GET, "/first", "HTTP/1.1 200 First\r\n"
      "X-Mine: first\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n");
  KJ_EXPECT(env.bounded(first.response.body->readAllText()) == "first");
  env.bounded(kj::mv(first.written));
  auto head = env.start(kj::HttpMethod::HEAD, "/head", "HTTP/1.1 200 Head\r\n"
      "X-Mine: head\r\nContent-Length: 99\r\n\r\n");
  env.bounded(kj::mv(head.written));
  for (int i = 0; i < 20; i++) {
    auto s = env.start(kj::HttpMethod::GET, "/n", "HTTP/1.1 200 OK\r\nX-Mine: later\r\n"
        "Content-Length: 10\r\n\r\nLATERBYTES");
    char buffer[16];
    // The older bodies, read in the middle of a later exchange.
    KJ_EXPECT(env.read(*first.response.body, buffer, 1, sizeof(buffer)) == 0);
    KJ_EXPECT(env.read(*head.response.body, buffer, 1, sizeof(buffer)) == 0);
    KJ_EXPECT(env.read(*s.response.body, buffer, 10, 10) == 10);
    KJ_EXPECT(env.bounded(first.response.body->readAllText()) == "");
    Collector sink;
    KJ_EXPECT(env.bounded(first.response.body->pumpTo(sink)) == 0);
    KJ_EXPECT(env.bounded(head.response.body->pumpTo(sink)) == 0);
    env.bounded(kj::mv(s.written));
  }
  KJ_EXPECT(first.response.statusText == "First");
  KJ_EXPECT(header(*first.response.headers, "X-Mine") == "first");
  KJ_EXPECT(head.response.statusText == "Head");
  KJ_EXPECT(header(*head.response.headers, "X-Mine") == "head");
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 22);
}

// =================================================================================================
// Pumps and limits

BOTH_TRANSPORTS(pumps, "caller edge: bodies pumped (whole, limited, into a pipe) and then reused") {
  auto big = kj::heapString(300000);
  for (size_t i = 0; i < big.size(); i++) big[i] = 'a' + (i * 7 + i / 4093) % 26;
  auto fixed = kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", big.size(), "\r\n\r\n", big);
  auto chunked = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
      kj::hex(100000u), "\r\n", big.slice(0, 100000), "\r\n", kj::hex(200000u), "\r\n",
      big.slice(100000), "\r\n0\r\nX-T: 1\r\n\r\n");
  for (auto reply: {fixed.asPtr(), chunked.asPtr()}) {
    // Into a stream without a pump of its own.
    {
      auto s = env.start(kj::HttpMethod::GET, "/", reply);
      Collector sink;
      KJ_EXPECT(env.bounded(s.response.body->pumpTo(sink)) == big.size());
      KJ_EXPECT(sink.text() == big);
      KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
      env.bounded(kj::mv(s.written));
      env.roundTrip();
    }
    // Limited pumps, then the rest by reads.
    {
      auto s = env.start(kj::HttpMethod::GET, "/", reply);
      Collector sink;
      KJ_EXPECT(env.bounded(s.response.body->pumpTo(sink, 3)) == 3);
      KJ_EXPECT(env.bounded(s.response.body->pumpTo(sink, 0)) == 0);
      KJ_EXPECT(env.bounded(s.response.body->pumpTo(sink, 99997)) == 99997);
      KJ_EXPECT(env.fetcher->getState() == State::BUSY);
      auto rest = env.bounded(s.response.body->readAllText());
      KJ_EXPECT(kj::str(sink.text(), rest) == big);
      KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
      env.bounded(kj::mv(s.written));
      env.roundTrip();
    }
    // Into a kj pipe (which has a pump of its own), read at the other end.
    {
      auto s = env.start(kj::HttpMethod::GET, "/", reply);
      auto pipe = kj::newOneWayPipe();
      auto pumped = s.response.body->pumpTo(*pipe.out).then([&](uint64_t n) {
        pipe.out = nullptr;
        return n;
      });
      auto received = pipe.in->readAllText();
      KJ_EXPECT(env.bounded(kj::mv(pumped)) == big.size());
      KJ_EXPECT(env.bounded(kj::mv(received)) == big);
      KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
      env.bounded(kj::mv(s.written));
      env.roundTrip();
    }
  }
}

BOTH_TRANSPORTS(pumpCancelled,
    "caller edge: a pump cancelled midway, then the body dropped, closes the connection") {
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/", env.headers());
  req.body = nullptr;
  env.peer->readRequest();
  auto written = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello");
  auto response = env.bounded(kj::mv(req.response));
  Collector sink;
  auto pump = response.body->pumpTo(sink);
  env.waitFor([&]() { return sink.bytes.size() == 5; });
  KJ_EXPECT(sink.text() == "hello");
  KJ_EXPECT(!pump.poll(env.ws));
  env.bounded(kj::mv(written));
  pump = nullptr;  // cancelled in the middle of a read
  KJ_EXPECT(env.fetcher->getState() == State::BUSY);
  response.body = nullptr;
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::ABANDONED, env.why());
  KJ_EXPECT(env.peerSawEnd());
  KJ_EXPECT_THROW(DISCONNECTED, env.fetcher->request(kj::HttpMethod::GET, "/", env.headers()));
}

BOTH_TRANSPORTS(readAllLimit,
    "caller edge: readAllBytes() with a limit below the body fails, and the dropped body closes") {
  auto s = env.start(kj::HttpMethod::GET, "/", "HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n"
      "0123456789abcdefghij");
  auto e = env.failureOf(s.response.body->readAllBytes(7));
  KJ_EXPECT(contains(e.getDescription(), "limit"), e);
  KJ_EXPECT(env.fetcher->getState() != State::IDLE);
  s.response.body = nullptr;
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::ABANDONED, env.why());
  s.written = nullptr;  // (a pipe's write of the unread rest never completes)
  KJ_EXPECT(env.peerSawEnd());
}

// =================================================================================================
// Ordering: re-entrant requests, observers, release()

BOTH_TRANSPORTS(requestFromReadContinuation,
    "caller edge: the next request from the continuation that read a body's end") {
  for (auto reply: {OK_HELLO, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           "2\r\nhe\r\n3\r\nllo\r\n0\r\nX-T: 1\r\n\r\n"_kj}) {
    for (bool exactRead: {false, true}) {
      auto s = env.start(kj::HttpMethod::GET, "/", reply);
      kj::Maybe<kj::HttpClient::Request> next;
      State seen = State::BUSY;
      char buffer[8];
      kj::Promise<size_t> read = exactRead
          // minBytes == maxBytes == the body's length; a chunked body then needs a read of 0 too.
          ? s.response.body->tryRead(buffer, 5, 5).then([&](size_t n) {
              return s.response.body->tryRead(buffer + n, 1, 1).then([n](size_t m) {
                return n + m;
              });
            })
          : s.response.body->readAllText().then([&](kj::String t) {
              memcpy(buffer, t.begin(), t.size());
              return t.size();
            });
      auto done = read.then([&](size_t n) {
        seen = env.fetcher->getState();
        next = env.fetcher->request(kj::HttpMethod::GET, "/next", env.headers());
        return n;
      });
      KJ_EXPECT(env.bounded(kj::mv(done)) == 5);
      KJ_EXPECT(memcmp(buffer, "hello", 5) == 0);
      KJ_EXPECT(seen == State::IDLE, env.why());
      env.bounded(kj::mv(s.written));
      auto& n = KJ_ASSERT_NONNULL(next);
      n.body = nullptr;
      auto request = env.peer->readRequest();
      KJ_EXPECT(request.startsWith("GET /next HTTP/1.1\r\n"), request);
      auto written = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext");
      auto response = env.bounded(kj::mv(n.response));
      KJ_EXPECT(env.bounded(response.body->readAllText()) == "next");
      env.bounded(kj::mv(written));
      KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
      // The old body, read again, is still over.
      KJ_EXPECT(env.read(*s.response.body, buffer, 1, 1) == 0);
    }
  }
  env.roundTrip();
}

BOTH_TRANSPORTS(requestFromObserver,
    "caller edge: an observer starts the next request from fetcherIdle, after bodies and HEAD") {
  Observer observer;
  kj::Vector<kj::HttpClient::Request> started;
  bool startNext = true;
  observer.onIdle = [&](StreamFetcher& f) {
    if (!startNext) return;
    startNext = false;
    started.add(f.request(kj::HttpMethod::GET, kj::str("/from-observer/", started.size()),
        env.headers()));
  };
  env.fetcher->setObserver(observer);
  for (auto reply: {OK_HELLO, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           "5\r\nhello\r\n0\r\n\r\n"_kj, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"_kj}) {
    startNext = true;
    bool head = !reply.endsWith("hello") && !reply.endsWith("\r\n0\r\n\r\n");
    auto s = env.start(head ? kj::HttpMethod::HEAD : kj::HttpMethod::GET, "/", reply);
    if (!head) {
      KJ_EXPECT(env.fetcher->getState() == State::BUSY);
      KJ_EXPECT(env.bounded(s.response.body->readAllText()) == "hello");
    }
    // The observer's request is in flight already.
    KJ_EXPECT(!startNext);
    KJ_EXPECT(env.fetcher->getState() == State::BUSY, env.why());
    env.bounded(kj::mv(s.written));
    auto& next = started.back();
    next.body = nullptr;
    auto request = env.peer->readRequest();
    KJ_EXPECT(request.startsWith(kj::str("GET /from-observer/", started.size() - 1, " ")),
        request);
    auto written = env.peer->sendLater(OK_HELLO);
    auto response = env.bounded(kj::mv(next.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "hello");
    env.bounded(kj::mv(written));
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why());
  }
  KJ_EXPECT(observer.idle == 6);
  KJ_EXPECT(observer.closed == 0);
  env.fetcher->setObserver(nullptr);
  env.roundTrip();
}

BOTH_TRANSPORTS(observerResetsItself,
    "caller edge: an observer that resets itself in fetcherIdle is never called again") {
  auto observer = kj::heap<Observer>();
  observer->onIdle = [&](StreamFetcher& f) { f.setObserver(nullptr); };
  env.fetcher->setObserver(*observer);
  env.roundTrip();
  KJ_EXPECT(observer->idle == 1);
  observer = nullptr;  // gone: any later call would be a use after free (ASan)
  env.roundTrip();
  env.peer->close();
  env.waitFor([&]() { return env.fetcher->getState() == State::CLOSED; });
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::PEER_CLOSED_IDLE, env.why());
}

BOTH_TRANSPORTS(releaseFromObserver,
    "caller edge: release() from fetcherIdle, then a new fetcher over the released stream") {
  Observer observer;
  kj::Maybe<kj::Own<kj::AsyncIoStream>> released;
  observer.onIdle = [&](StreamFetcher& f) { released = f.release(); };
  env.fetcher->setObserver(observer);
  // A response whose headers are used after the fetcher and its connection are gone.
  auto s = env.start(kj::HttpMethod::GET, "/", "HTTP/1.1 200 Released\r\nX-Kept: yes\r\n"
      "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
  KJ_EXPECT(env.bounded(s.response.body->readAllText()) == "hello");
  env.bounded(kj::mv(s.written));
  KJ_EXPECT(env.fetcher->getState() == State::RELEASED);
  auto second = kj::heap<StreamFetcher>(kj::mv(KJ_ASSERT_NONNULL(released)), env.table,
      env.settings());
  env.fetcher->setObserver(nullptr);
  env.fetcher = nullptr;
  for (int i = 0; i < 5; i++) {
    env.roundTrip(kj::str("/second/", i), second);
    env.settle(2 * kj::MILLISECONDS);  // the idle watches (both layers) get going
    KJ_EXPECT(second->getState() == State::IDLE);
  }
  KJ_EXPECT(second->getCompletedRequests() == 5);
  second = nullptr;
  KJ_EXPECT(env.peerSawEnd());
  KJ_EXPECT(s.response.statusText == "Released");
  KJ_EXPECT(header(*s.response.headers, "X-Kept") == "yes");
  char c;
  KJ_EXPECT(env.read(*s.response.body, &c, 1, 1) == 0);
}

void releasedUnsolicited(Env& env, bool settleFirst) {
  Observer observer;
  kj::Maybe<kj::Own<kj::AsyncIoStream>> released;
  observer.onIdle = [&](StreamFetcher& f) { released = f.release(); };
  env.fetcher->setObserver(observer);
  env.roundTrip("/");
  env.fetcher->setObserver(nullptr);
  // Nobody asked for this: a new fetcher over the released stream must not take it as the
  // response to its first request.
  auto evil = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!");
  if (settleFirst) env.settle(5 * kj::MILLISECONDS);
  auto second = kj::heap<StreamFetcher>(kj::mv(KJ_ASSERT_NONNULL(released)), env.table,
      env.settings());
  auto outcome = kj::evalNow([&]() {
    auto req = second->request(kj::HttpMethod::GET, "/victim", env.headers());
    req.body = nullptr;
    return req.response.then([](kj::HttpClient::Response&& r) {
      return r.body->readAllText().attach(kj::mv(r.body));
    });
  });
  auto e = env.failureOf(kj::mv(outcome));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(second->getState() == State::CLOSED);
  KJ_EXPECT(second->getCloseKind() == Kind::UNSOLICITED_BYTES,
      KJ_ASSERT_NONNULL(second->getCloseReason()));
  evil = nullptr;
}

BOTH_TRANSPORTS(releasedStreamUnsolicitedAtOnce,
    "caller edge: bytes sent right after an observer's release() never answer a new fetcher") {
  releasedUnsolicited(env, false);
}

BOTH_TRANSPORTS(releasedStreamUnsolicitedLater,
    "caller edge: bytes buffered before a new fetcher is built on a released stream poison it") {
  releasedUnsolicited(env, true);
}

// =================================================================================================
// Request bodies

BOTH_TRANSPORTS(emptyWrites,
    "caller edge: zero-byte writes, zero-piece writes, empty POSTs and a GET with a body") {
  kj::ArrayPtr<const kj::byte> none[1];
  auto noPieces = kj::arrayPtr(none, size_t(0));
  kj::ArrayPtr<const kj::byte> somePieces[3] = {
      kj::ArrayPtr<const kj::byte>(), "lo"_kj.asBytes(), kj::ArrayPtr<const kj::byte>()};
  struct Case {
    kj::HttpMethod method;
    kj::Maybe<uint64_t> size;
    bool teHeader;
    kj::StringPtr expectHead;  // in the request the server got
    kj::StringPtr expectBody;
    bool write;
  };
  for (auto c: {Case{kj::HttpMethod::POST, uint64_t(5), false, "Content-Length: 5", "hello", true},
           Case{kj::HttpMethod::POST, nullptr, false, "Transfer-Encoding: chunked", "hello", true},
           Case{kj::HttpMethod::POST, uint64_t(0), false, "Content-Length: 0", "", false},
           Case{kj::HttpMethod::PUT, nullptr, false, "Transfer-Encoding: chunked", "", false},
           Case{kj::HttpMethod::DELETE, nullptr, false, "Transfer-Encoding: chunked", "", false},
           Case{kj::HttpMethod::GET, nullptr, true, "Transfer-Encoding: chunked", "hello", true}}) {
    auto h = env.headers();
    if (c.teHeader) h.set(kj::HttpHeaderId::TRANSFER_ENCODING, "chunked");
    auto req = env.fetcher->request(c.method, "/upload", h, c.size);
    auto& out = *req.body;
    // One write at a time, chained: an in-process pipe completes a write only once it is read.
    auto writes = out.write("", 0).then([&]() { return out.write(noPieces); });
    if (c.write) {
      writes = writes.then([&]() { return out.write("hel", 3); })
          .then([&]() { return out.write(somePieces); })
          .then([&]() { return out.write(noPieces); })
          .then([&]() { return out.write("x", 0); });
    }
    writes = writes.then([&]() { req.body = nullptr; }).eagerlyEvaluate(nullptr);
    auto request = env.peer->readRequest();
    env.bounded(kj::mv(writes));
    KJ_EXPECT(contains(request, c.expectHead), request);
    KJ_EXPECT(request.endsWith(kj::str("\r\n\r\n", c.expectBody)), request);
    auto written = env.peer->sendLater(OK_HELLO);
    auto response = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "hello");
    env.bounded(kj::mv(written));
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.why(), request);
    // Nothing more was written (no second terminator, no stray bytes).
    KJ_EXPECT(env.peer->readWouldBlock(), request);
  }
  env.roundTrip();
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 7);
}

BOTH_TRANSPORTS(whenWriteDisconnectedBody,
    "caller edge: whenWriteDisconnected() on a request body settles when the server goes, and "
    "may outlive everything") {
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/", env.headers());
  auto write = writeAll(*req.body, "part"_kj.asBytes());
  env.peer->readHead();
  KJ_EXPECT(env.peer->readExactly(9) == "4\r\npart\r\n");
  env.bounded(kj::mv(write));
  auto disconnected = req.body->whenWriteDisconnected();
  KJ_EXPECT(!disconnected.poll(env.ws));
  // (A TCP FIN alone does not make kj's own socket report a write disconnect: the server resets.)
  if (env.tcp) {
    test::resetConnection(*env.peer);
  } else {
    env.peer->close();
  }
  // Settles (either way) once the server is gone.
  bool settled = env.bounded(disconnected.then([]() { return true; },
      [](kj::Exception&&) { return true; }));
  KJ_EXPECT(settled);
  // Asked again after the server went, and kept past the fetcher, body and response promise.
  auto again = req.body->whenWriteDisconnected();
  env.fetcher = nullptr;
  req.body = nullptr;
  req.response = nullptr;
  env.settle();
  again = nullptr;
}

// =================================================================================================
// WebSocket handshakes

kj::String handshakeFor(kj::StringPtr head) {
  auto keyStart = strstr(head.cStr(), "Sec-WebSocket-Key: ");
  KJ_ASSERT(keyStart != nullptr, head);
  keyStart += strlen("Sec-WebSocket-Key: ");
  auto key = kj::heapString(keyStart, strchr(keyStart, '\r') - keyStart);
  return kj::str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
      "Connection: Upgrade\r\nSec-WebSocket-Accept: ", test::webSocketAccept(key), "\r\n\r\n");
}

BOTH_TRANSPORTS(webSocketDroppedBeforeAnswer,
    "caller edge: a WebSocket handshake dropped before its answer closes the connection") {
  auto promise = env.fetcher->openWebSocket("/ws", env.headers());
  auto head = env.peer->readHead();
  KJ_EXPECT(head.startsWith("GET /ws HTTP/1.1\r\n"), head);
  promise = nullptr;
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::ABANDONED, env.why());
  KJ_EXPECT(env.peerSawEnd());
}

BOTH_TRANSPORTS(webSocketDroppedAfter101,
    "caller edge: a WebSocket dropped right after the 101 closes the connection") {
  auto promise = env.fetcher->openWebSocket("/ws", env.headers());
  auto handshake = handshakeFor(env.peer->readHead());
  auto written = env.peer->sendLater(handshake);
  auto response = env.bounded(kj::mv(promise));
  KJ_EXPECT(response.statusCode == 101);
  env.bounded(kj::mv(written));
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::UPGRADED, env.why());
  response.webSocketOrBody = kj::Own<kj::AsyncInputStream>();
  KJ_EXPECT(env.peerSawEnd());
  KJ_EXPECT_THROW(DISCONNECTED, env.fetcher->openWebSocket("/ws", env.headers()));
}

BOTH_TRANSPORTS(webSocketRefusedBodyDropped,
    "caller edge: a refused handshake's body read in part, then dropped, closes the connection") {
  auto promise = env.fetcher->openWebSocket("/ws", env.headers());
  env.peer->readHead();
  auto written = env.peer->sendLater("HTTP/1.1 403 Forbidden\r\nX-Why: nope\r\n"
      "Content-Length: 10\r\n\r\nforbid");
  auto response = env.bounded(kj::mv(promise));
  KJ_EXPECT(response.statusCode == 403);
  auto& body = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>());
  char buffer[4];
  KJ_EXPECT(env.read(body, buffer, 4, 4) == 4);
  KJ_EXPECT(memcmp(buffer, "forb", 4) == 0);
  env.bounded(kj::mv(written));
  KJ_EXPECT(response.statusText == "Forbidden");
  KJ_EXPECT(header(*response.headers, "X-Why") == "nope");
  response.webSocketOrBody = kj::Own<kj::AsyncInputStream>();
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED);
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::ABANDONED, env.why());
  KJ_EXPECT(env.peerSawEnd());
}

BOTH_TRANSPORTS(webSocketOutlivesFetcher,
    "caller edge: a WebSocket keeps working after its fetcher is destroyed") {
  auto promise = env.fetcher->openWebSocket("/ws", env.headers());
  auto handshake = handshakeFor(env.peer->readHead());
  auto written = env.peer->sendLater(handshake);
  auto response = env.bounded(kj::mv(promise));
  env.bounded(kj::mv(written));
  auto& socket = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  env.fetcher = nullptr;
  auto frame = env.peer->sendLater("\x81\x03hey");
  auto message = env.bounded(socket.receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(message.tryGet<kj::String>()) == "hey");
  env.bounded(kj::mv(frame));
  auto sent = socket.send("yo"_kj);
  KJ_EXPECT(env.peer->readExactly(8).size() == 8);  // masked: 2 + 4 + 2
  env.bounded(kj::mv(sent));
  KJ_EXPECT(response.headers->get(kj::HttpHeaderId::UPGRADE) != nullptr);
  response.webSocketOrBody = kj::Own<kj::AsyncInputStream>();
  KJ_EXPECT(env.peerSawEnd());
}

}  // namespace
}  // namespace sockfetch
