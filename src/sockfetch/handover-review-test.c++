// A review of StreamFetcher's hand-over surfaces, from the code (stream-fetcher.{h,c++},
// framed-stream.{h,c++}), each claim proved with a scripted peer over loopback TCP, in-process
// pipes, or wrappers (the TLS-like one of test-util.h, one without a descriptor, one whose reads
// the test completes by hand). Covered here and nowhere else:
//  - release() at each moment of the idle read: due but not started (a plain socket, the loop
//    never idle), started, completed with a byte / EOF / an error whose continuation has not run
//    yet (the stream comes back and the outcome is read first), completed and reported (refused);
//  - the released stream as a plain kj::AsyncIoStream: reads with every minBytes/maxBytes shape,
//    tryGetLength(), pumpTo(), write(), shutdownWrite(), whenWriteDisconnected(), getFd();
//  - released streams wrapped in a new StreamFetcher, again and again (a chain of fetchers over
//    fetchers' streams), with uploads and release() at every link, from fetcherIdle() too; the
//    last link's idle watch and gate (a whole response sent while idle, a FIN not yet polled)
//    at depths up to 8;
//  - streams that are not kj's sockets (in-process pipes, a wrapper without a descriptor, the
//    TLS-like wrapper with and without Settings::timer): the idle watch, the gate before the first
//    write, and uploads (fixed, chunked, Expect: 100-continue, early answers) on each;
//  - WebSockets over those streams: frames glued to the 101, both directions, the close
//    handshake, abort(), and the fetcher destroyed while the WebSocket lives.
// embedder-contract-test covers release() in its plain states and the TCP/TLS-like WebSocket
// cases, caller-edge-test release() from fetcherIdle() over a pipe and TCP, fix-review-test the
// WebSocket receive() given up on over a pipe and TCP. Every wait is bounded. No defect was
// found: every case here pins behaviour that holds.

#include <sockfetch/kj-compat.h>
#include <sockfetch/stream-fetcher.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

namespace sockfetch {
namespace {

using test::contains;
using test::Peer;
using State = StreamFetcher::State;

constexpr kj::StringPtr OK = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"_kj;

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

kj::String unmask(kj::ArrayPtr<const char> frame) {
  // The payload of one masked (client) frame under 126 bytes.
  KJ_ASSERT(frame.size() >= 6);
  size_t size = frame[1] & 0x7f;
  KJ_ASSERT(size < 126 && frame.size() == 6 + size);
  auto out = kj::heapString(size);
  for (size_t i = 0; i < size; i++) out[i] = frame[6 + i] ^ frame[2 + i % 4];
  return out;
}

// -------------------------------------------------------------------------------------------------
// Streams

class NoFd final: public kj::AsyncIoStream {
  // A wrapper that forwards everything but has no descriptor (as a stream of a library that does
  // its own I/O would).
public:
  explicit NoFd(kj::Own<kj::AsyncIoStream> inner): inner(kj::mv(inner)) {}
  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    return inner->tryRead(buffer, minBytes, maxBytes);
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    return inner->write(buffer, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return inner->write(pieces);
  }
  kj::Promise<void> whenWriteDisconnected() override { return inner->whenWriteDisconnected(); }
  void shutdownWrite() override { inner->shutdownWrite(); }
  void abortRead() override { inner->abortRead(); }

private:
  kj::Own<kj::AsyncIoStream> inner;
};

struct HeldRead {
  kj::byte* buffer;
  size_t minBytes;
  size_t maxBytes;
  kj::Own<kj::PromiseFulfiller<size_t>> fulfiller;
};

class HandRead final: public kj::AsyncIoStream {
  // A wrapper whose reads, while `hold` is set, complete only when the test says so (so that the
  // test decides what a read got, and when: its continuation runs in a later turn).
public:
  HandRead(kj::Own<kj::AsyncIoStream> inner, kj::Maybe<HeldRead>& held)
      : inner(kj::mv(inner)), held(held) {}
  bool hold = true;
  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    if (!hold) return inner->tryRead(buffer, minBytes, maxBytes);
    auto paf = kj::newPromiseAndFulfiller<size_t>();
    held = HeldRead{reinterpret_cast<kj::byte*>(buffer), minBytes, maxBytes,
        kj::mv(paf.fulfiller)};
    return kj::mv(paf.promise);
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    return inner->write(buffer, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return inner->write(pieces);
  }
  kj::Promise<void> whenWriteDisconnected() override { return inner->whenWriteDisconnected(); }
  void shutdownWrite() override { inner->shutdownWrite(); }

private:
  kj::Own<kj::AsyncIoStream> inner;
  kj::Maybe<HeldRead>& held;
};

class Collect final: public kj::AsyncOutputStream {
  // An output stream that keeps what is written to it.
public:
  kj::Vector<char> got;
  kj::Promise<void> write(const void* buffer, size_t size) override {
    got.addAll(reinterpret_cast<const char*>(buffer), reinterpret_cast<const char*>(buffer) + size);
    return kj::READY_NOW;
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    for (auto& p: pieces) write(p.begin(), p.size());
    return kj::READY_NOW;
  }
  kj::Promise<void> whenWriteDisconnected() override { return kj::NEVER_DONE; }
  kj::String text() { return kj::heapString(got.begin(), got.size()); }
};

enum class Kind { TCP, PIPE, NO_FD_TCP, NO_FD_PIPE, TLS_LIKE };

kj::StringPtr KJ_STRINGIFY(Kind k) {
  switch (k) {
    case Kind::TCP: return "tcp";
    case Kind::PIPE: return "pipe";
    case Kind::NO_FD_TCP: return "no-fd wrapper over tcp";
    case Kind::NO_FD_PIPE: return "no-fd wrapper over a pipe";
    case Kind::TLS_LIKE: return "tls-like over tcp";
  }
  KJ_UNREACHABLE;
}

constexpr Kind ALL_KINDS[] = {Kind::TCP, Kind::PIPE, Kind::NO_FD_TCP, Kind::NO_FD_PIPE,
    Kind::TLS_LIKE};

struct Env: public test::LoopEnv {
  kj::Own<StreamFetcher> fetcher;
  kj::Own<Peer> peer;
  Kind kind;

  explicit Env(Kind kind, bool withTimer = true): kind(kind) {
    bool tcp = kind == Kind::TCP || kind == Kind::NO_FD_TCP || kind == Kind::TLS_LIKE;
    auto t = tcp ? test::tcpTransport(io) : test::pipeTransport();
    kj::Own<kj::AsyncIoStream> client = kj::mv(t.client);
    if (kind == Kind::NO_FD_TCP || kind == Kind::NO_FD_PIPE) {
      client = kj::heap<NoFd>(kj::mv(client));
    } else if (kind == Kind::TLS_LIKE) {
      client = test::tlsLike(kj::mv(client));
    }
    fetcher = kj::heap<StreamFetcher>(kj::mv(client), table, settings(withTimer));
    peer = kj::heap<Peer>(ws, kj::mv(t.server));
  }

  StreamFetcher::Settings settings(bool withTimer = true) {
    StreamFetcher::Settings s;
    if (withTimer) s.timer = timer;
    return s;
  }

  kj::String get(StreamFetcher& f, kj::StringPtr path) {
    // One GET answered with OK; returns the body.
    auto h = headers();
    auto req = f.request(kj::HttpMethod::GET, path, h);
    req.body = nullptr;
    auto request = peer->readRequest();
    KJ_EXPECT(request.startsWith(kj::str("GET ", path, " ")), request);
    auto sending = peer->sendLater(OK);
    auto response = bounded(kj::mv(req.response));
    auto text = bounded(response.body->readAllText());
    bounded(kj::mv(sending));
    return text;
  }

  kj::String readN(kj::AsyncInputStream& in, size_t n) {
    // Reads exactly n bytes, in as many reads as it takes.
    auto buffer = kj::heapString(n);
    size_t got = 0;
    while (got < n) {
      size_t r = bounded(kj::evalNow([&]() {
        return in.tryRead(buffer.begin() + got, 1, n - got);
      }));
      KJ_ASSERT(r > 0, "premature end", got, n);
      got += r;
    }
    return buffer;
  }
};

// =================================================================================================
// release() at each moment of the idle read

KJ_TEST("release() on a plain socket whose idle read is due but not started: bytes already in "
        "the kernel come back, in order, none lost") {
  // framed-stream.h: on a plain socket the idle read starts only once the loop is idle; a
  // release() before that has nothing to hand over but the socket itself.
  Env env(Kind::TCP);
  KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
  // The loop never went idle since the exchange ended (bounded() returns from the turn that
  // completed the body): bytes the server sends now sit in the kernel, unread by anyone.
  int fd = KJ_ASSERT_NONNULL(env.peer->getStream().getFd());
  KJ_ASSERT(::write(fd, "ABCD", 4) == 4);
  auto released = env.fetcher->release();
  KJ_EXPECT(env.fetcher->getState() == State::RELEASED);
  KJ_EXPECT(env.readN(*released, 4) == "ABCD");
}

KJ_TEST("release() with the idle read started and pending (plain socket), the server's bytes "
        "arriving after: the idle read's byte comes first, then the rest") {
  Env env(Kind::TCP);
  KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
  env.settle();  // the loop went idle: the deferred idle read is outstanding
  KJ_ASSERT(env.fetcher->getState() == State::IDLE);
  auto released = env.fetcher->release();
  env.fetcher = nullptr;  // the released stream does not depend on the fetcher
  int fd = KJ_ASSERT_NONNULL(env.peer->getStream().getFd());
  KJ_ASSERT(::write(fd, "WXYZ", 4) == 4);
  char buffer[4];
  // One read asking for all four at once: the idle read's byte plus three from the socket.
  KJ_EXPECT(env.bounded(released->tryRead(buffer, 4, 4)) == 4);
  KJ_EXPECT(kj::heapString(buffer, 4) == "WXYZ");
}

struct HandEnv: public test::LoopEnv {
  // A fetcher over a HandRead wrapper over a pipe: the idle read is the test's to complete.
  kj::Maybe<HeldRead> held;
  HandRead* hand;
  kj::Own<StreamFetcher> fetcher;
  kj::Own<Peer> peer;

  HandEnv() {
    auto t = test::pipeTransport();
    auto wrapper = kj::heap<HandRead>(kj::mv(t.client), held);
    hand = wrapper.get();
    fetcher = kj::heap<StreamFetcher>(kj::mv(wrapper), table);
    peer = kj::heap<Peer>(ws, kj::mv(t.server));
  }

  HeldRead take() {
    KJ_IF_SOME(h, held) {
      auto out = kj::mv(h);
      held = nullptr;
      return out;
    }
    KJ_FAIL_ASSERT("no read outstanding");
  }
};

KJ_TEST("release() with the idle read completed with a byte whose continuation has not run: "
        "the fetcher is still IDLE, and the byte is the first the released stream reads") {
  // framed-stream.h: the idle read is never cancelled, since it may hold a byte already.
  HandEnv env;
  auto probe = env.take();
  KJ_EXPECT(probe.minBytes == 1 && probe.maxBytes == 1);
  probe.buffer[0] = 'Q';
  probe.fulfiller->fulfill(1);
  KJ_EXPECT(env.fetcher->getState() == State::IDLE);  // not reported yet
  auto released = env.fetcher->release();
  env.hand->hold = false;
  auto more = env.peer->sendLater("RS");
  char buffer[3];
  KJ_EXPECT(env.bounded(released->tryRead(buffer, 3, 3)) == 3);
  KJ_EXPECT(kj::heapString(buffer, 3) == "QRS");
  env.bounded(kj::mv(more));
}

KJ_TEST("release() with the idle read completed with EOF, not yet reported: the released stream "
        "reads its end (0) at once, and again") {
  HandEnv env;
  auto probe = env.take();
  probe.fulfiller->fulfill(0);
  auto released = env.fetcher->release();
  char buffer[8];
  KJ_EXPECT(env.bounded(released->tryRead(buffer, 1, 8)) == 0);
  KJ_EXPECT(env.bounded(released->tryRead(buffer, 1, 8)) == 0);
}

KJ_TEST("release() with the idle read failed, not yet reported: the released stream's first "
        "read fails with that error") {
  HandEnv env;
  auto probe = env.take();
  probe.fulfiller->reject(KJ_EXCEPTION(DISCONNECTED, "handread: the connection broke"));
  auto released = env.fetcher->release();
  char buffer[8];
  auto e = env.failureOf(released->tryRead(buffer, 1, 8));
  KJ_EXPECT(contains(e.getDescription(), "handread: the connection broke"), e);
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
}

KJ_TEST("release() after the idle read reported a byte is refused, FAILED, saying the server "
        "sent data while idle") {
  HandEnv env;
  KJ_ASSERT(env.fetcher->getState() == State::IDLE);
  auto probe = env.take();
  probe.buffer[0] = 'X';
  probe.fulfiller->fulfill(1);
  env.waitFor([&]() { return env.fetcher->getState() == State::CLOSED; });
  auto e = KJ_ASSERT_NONNULL(kj::runCatchingExceptions([&]() { env.fetcher->release(); }));
  KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
  KJ_EXPECT(contains(e.getDescription(), "release(): there is no connection to give back"), e);
  KJ_EXPECT(contains(e.getDescription(), "before any request was sent on it"), e);
}

KJ_TEST("release() while BUSY is refused and leaves the exchange in flight untouched; after its "
        "body ends, release() succeeds and the stream is in step") {
  Env env(Kind::PIPE);
  auto h = env.headers();
  auto req = env.fetcher->request(kj::HttpMethod::GET, "/a", h);
  req.body = nullptr;
  auto e = KJ_ASSERT_NONNULL(kj::runCatchingExceptions([&]() { env.fetcher->release(); }));
  KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED, e);
  KJ_EXPECT(contains(e.getDescription(), "release() needs an idle StreamFetcher"), e);
  KJ_EXPECT(env.fetcher->getState() == State::BUSY);
  env.peer->readRequest();
  auto sending = env.peer->sendLater(OK);
  auto response = env.bounded(kj::mv(req.response));
  // Head read, body not yet: still busy.
  KJ_EXPECT_THROW_RECOVERABLE_MESSAGE("idle", env.fetcher->release());
  KJ_EXPECT(env.bounded(response.body->readAllText()) == "ok");
  env.bounded(kj::mv(sending));
  auto released = env.fetcher->release();
  auto w = env.peer->sendLater("next");
  KJ_EXPECT(env.readN(*released, 4) == "next");
  env.bounded(kj::mv(w));
}

KJ_TEST("a byte the idle read got but had not reported, released and wrapped in a new "
        "StreamFetcher at once: its first request fails DISCONNECTED with nothing written, as the "
        "server speaking first") {
  // The new fetcher's idle read adopts the released stream's; its gate sees the byte before the
  // request is written.
  HandEnv env;
  auto probe = env.take();
  probe.buffer[0] = 'S';
  probe.fulfiller->fulfill(1);
  env.hand->hold = false;
  StreamFetcher second(env.fetcher->release(), env.table);
  auto h = env.headers();
  auto req = second.request(kj::HttpMethod::GET, "/", h);
  req.body = nullptr;
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(second.getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES,
      second.getCloseKind());
  KJ_EXPECT(second.serverSpokeFirst());
  KJ_EXPECT(!second.lastExchangeWroteRequest());
  KJ_EXPECT(KJ_ASSERT_NONNULL(test::bytesBeforeEnd(env, env.peer->getStream())) == 0);
}

struct ReleaseOnIdle final: public StreamFetcher::Observer {
  // Releases the connection from fetcherIdle() and wraps it in a new fetcher right there.
  const kj::HttpHeaderTable& table;
  kj::Own<StreamFetcher> next;
  explicit ReleaseOnIdle(const kj::HttpHeaderTable& table): table(table) {}
  void fetcherIdle(StreamFetcher& fetcher) override {
    fetcher.setObserver(nullptr);
    next = kj::heap<StreamFetcher>(fetcher.release(), table);
  }
  void fetcherClosed(StreamFetcher&) override {}
};

void releaseFromObserver(Kind kind, kj::StringPtr answer) {
  KJ_CONTEXT(kind, answer);
  Env env(kind);
  ReleaseOnIdle observer(env.table);
  env.fetcher->setObserver(observer);
  auto h = env.headers();
  {
    auto req = env.fetcher->request(kj::HttpMethod::GET, "/", h);
    req.body = nullptr;
    env.peer->readRequest();
    auto sending = env.peer->sendLater(answer);
    auto response = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "ok");
    env.bounded(kj::mv(sending));
    KJ_EXPECT(env.fetcher->getState() == State::RELEASED, env.fetcher->getState());
    // The old response body, held past the hand-over, reads its end again.
    char c;
    KJ_EXPECT(env.bounded(response.body->tryRead(&c, 1, 1)) == 0);
  }
  KJ_ASSERT(observer.next.get() != nullptr);
  env.fetcher = nullptr;
  KJ_EXPECT(env.get(*observer.next, "/next") == "ok");
  KJ_EXPECT(env.get(*observer.next, "/again") == "ok");
}

KJ_TEST("release() from within fetcherIdle(), the stream wrapped in a new StreamFetcher there: "
        "both a Content-Length and a chunked (trailers, final CRLF) response end cleanly, and the "
        "new fetcher works") {
  for (auto kind: ALL_KINDS) {
    releaseFromObserver(kind, OK);
    releaseFromObserver(kind,
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n");
  }
}

// =================================================================================================
// The released stream as a plain kj::AsyncIoStream

void plainStreamUse(Kind kind) {
  KJ_CONTEXT(kind);
  Env env(kind);
  KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
  env.settle();  // the idle read is outstanding on every kind
  auto released = env.fetcher->release();
  env.fetcher = nullptr;

  // getFd(): the original descriptor, if any.
  bool hasFd = kind == Kind::TCP || kind == Kind::TLS_LIKE;
  KJ_EXPECT((released->getFd() != nullptr) == hasFd);
  // tryGetLength(): a connection has no known length.
  KJ_EXPECT(released->tryGetLength() == nullptr);

  auto sending = env.peer->sendLater("0123456789abcdefghij").eagerlyEvaluate(nullptr);
  char buffer[32];
  // maxBytes 0: nothing.
  KJ_EXPECT(env.bounded(released->tryRead(buffer, 0, 0)) == 0);
  // (1, 1), then (3, 3), then (2, 8) and (0, n) with whatever is there, in order.
  kj::Vector<char> all;
  KJ_ASSERT(env.bounded(released->tryRead(buffer, 1, 1)) == 1);
  all.add(buffer[0]);
  KJ_ASSERT(env.bounded(released->tryRead(buffer, 3, 3)) == 3);
  all.addAll(buffer, buffer + 3);
  size_t n = env.bounded(released->tryRead(buffer, 2, 8));
  KJ_ASSERT(n >= 2 && n <= 8, n);
  all.addAll(buffer, buffer + n);
  size_t z = env.bounded(released->tryRead(buffer, 0, 4));
  KJ_ASSERT(z <= 4, z);
  all.addAll(buffer, buffer + z);
  // pumpTo() the rest, by amount.
  Collect sink;
  size_t rest = 20 - all.size();
  KJ_EXPECT(env.bounded(released->pumpTo(sink, rest)) == rest);
  all.addAll(sink.got);
  KJ_EXPECT(kj::heapString(all.begin(), all.size()) == "0123456789abcdefghij",
      kj::heapString(all.begin(), all.size()));
  env.bounded(kj::mv(sending));

  // write() in both forms, then shutdownWrite(): the server reads them, then the end.
  // (A pipe completes a write only as the other end reads it: read, then wait.)
  auto w1 = released->write("hello ", 6);
  KJ_EXPECT(env.peer->readExactly(6) == "hello ");
  env.bounded(kj::mv(w1));
  auto a = "wor"_kj;
  auto b = "ld"_kj;
  kj::ArrayPtr<const kj::byte> pieces[] = {a.asBytes(), b.asBytes()};
  auto w2 = released->write(pieces);
  KJ_EXPECT(env.peer->readExactly(5) == "world");
  env.bounded(kj::mv(w2));
  released->shutdownWrite();
  KJ_EXPECT(env.peer->sawEof());
  // The server's end reaches the released stream as EOF.
  env.peer->getStream().shutdownWrite();
  KJ_EXPECT(env.bounded(released->tryRead(buffer, 1, 8)) == 0);
}

KJ_TEST("a released stream is a plain kj::AsyncIoStream: reads of every minBytes/maxBytes shape, "
        "tryGetLength(), pumpTo(), both write()s, shutdownWrite(), getFd(), on every transport") {
  for (auto kind: ALL_KINDS) plainStreamUse(kind);
}

void writeDisconnected(Kind kind) {
  KJ_CONTEXT(kind);
  Env env(kind);
  KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
  env.settle();
  auto released = env.fetcher->release();
  auto disconnected = released->whenWriteDisconnected();
  KJ_EXPECT(!disconnected.poll(env.ws));
  env.peer->close();
  env.bounded(kj::mv(disconnected));
}

KJ_TEST("a released stream's whenWriteDisconnected() resolves when the other end of a pipe goes") {
  // (kj's socket reports it only once a write fails, so pipes: the released stream forwards.)
  writeDisconnected(Kind::PIPE);
  writeDisconnected(Kind::NO_FD_PIPE);
}

// =================================================================================================
// Chains: a released stream under a new StreamFetcher, again and again

void chain(Kind kind, bool withTimer) {
  KJ_CONTEXT(kind, withTimer);
  Env env(kind, withTimer);
  auto h = env.headers();
  kj::Own<StreamFetcher> current = kj::mv(env.fetcher);
  for (unsigned link = 0; link < 4; link++) {
    KJ_CONTEXT(link);
    KJ_EXPECT(env.get(*current, kj::str("/get", link)) == "ok");
    {
      // A fixed-length upload.
      auto req = current->request(kj::HttpMethod::POST, "/fixed", h, uint64_t(5));
      auto writing = req.body->write("abcde", 5).then([&req]() { req.body = nullptr; })
          .eagerlyEvaluate(nullptr);
      auto request = env.peer->readRequest();
      env.bounded(kj::mv(writing));
      KJ_EXPECT(request.endsWith("\r\n\r\nabcde"), request);
      auto sending = env.peer->sendLater(OK);
      auto response = env.bounded(kj::mv(req.response));
      KJ_EXPECT(env.bounded(response.body->readAllText()) == "ok");
      env.bounded(kj::mv(sending));
    }
    {
      // A chunked upload.
      auto req = current->request(kj::HttpMethod::POST, "/chunked", h);
      auto writing = req.body->write("xyz", 3).then([&req]() { req.body = nullptr; })
          .eagerlyEvaluate(nullptr);
      auto request = env.peer->readRequest();
      env.bounded(kj::mv(writing));
      KJ_EXPECT(request.endsWith("\r\n\r\nxyz"), request);
      auto sending = env.peer->sendLater(
          "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n");
      auto response = env.bounded(kj::mv(req.response));
      KJ_EXPECT(env.bounded(response.body->readAllText()) == "ok");
      env.bounded(kj::mv(sending));
    }
    KJ_EXPECT(current->getState() == State::IDLE, current->getState());
    if (link % 2 == 1) env.settle();  // every other link, the idle read is outstanding
    auto released = current->release();
    current = kj::heap<StreamFetcher>(kj::mv(released), env.table, env.settings(withTimer));
  }
  // The last link still notices unsolicited bytes, as bytes after an exchange (not "first").
  env.settle();
  auto junk = env.peer->sendLater("junk").eagerlyEvaluate([](kj::Exception&&) {});
  env.waitFor([&]() { return current->getState() == State::CLOSED; });
  KJ_EXPECT(current->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES,
      current->getCloseKind());
  KJ_EXPECT(!current->serverSpokeFirst());
}

KJ_TEST("a released stream under a new StreamFetcher, four times in a chain, with GETs and "
        "fixed and chunked uploads at every link, then unsolicited bytes seen by the last") {
  for (auto kind: ALL_KINDS) chain(kind, true);
  chain(Kind::TCP, false);
  chain(Kind::PIPE, false);
}

KJ_TEST("a chain's gate: bytes the server sent while the last link was idle, not yet polled, "
        "fail the next request DISCONNECTED with nothing written (plain socket under two "
        "fetchers, with the timer)") {
  // framed-stream.c++: a fetcher over a released stream is not over a plain socket (the stream
  // is a FramedStream); its gate waits for input the kernel holds (hasUnreadInput()) with the
  // timer, so the bytes are seen before anything is written.
  Env env(Kind::TCP);
  KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
  auto second = kj::heap<StreamFetcher>(env.fetcher->release(), env.table, env.settings());
  KJ_ASSERT(env.get(*second, "/2") == "ok");
  env.settle();
  int fd = KJ_ASSERT_NONNULL(env.peer->getStream().getFd());
  KJ_ASSERT(::write(fd, "HTTP/1.1 200 OK\r\n", 17) == 17);
  auto h = env.headers();
  auto req = second->request(kj::HttpMethod::GET, "/3", h);
  req.body = nullptr;
  auto e = env.failureOf(kj::mv(req.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(second->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES,
      second->getCloseKind(), e);
  KJ_EXPECT(KJ_ASSERT_NONNULL(test::bytesBeforeEnd(env, env.peer->getStream())) == 0,
        "the request was written on a poisoned connection");
}

void deepChainGate(Kind kind, unsigned depth) {
  KJ_CONTEXT(kind, depth);
  Env env(kind);
  KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
  kj::Own<StreamFetcher> current = kj::mv(env.fetcher);
  for (unsigned i = 0; i < depth; i++) {
    current = kj::heap<StreamFetcher>(current->release(), env.table, env.settings());
  }
  env.settle();
  KJ_ASSERT(current->getState() == State::IDLE);
  // A whole response nobody asked for, then at once (same turn) a request: the request must not
  // get it.
  auto evil = env.peer->sendLater("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!")
      .eagerlyEvaluate([](kj::Exception&&) {});
  auto h = env.headers();
  auto req = current->request(kj::HttpMethod::GET, "/mine", h);
  req.body = nullptr;
  auto outcome = env.bounded(req.response.then([](kj::HttpClient::Response&& r) {
    return r.body->readAllText().attach(kj::mv(r.body));
  }, [](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); }));
  KJ_EXPECT(outcome.startsWith("failed: the server sent data on the idle connection before the "
      "request was written"), outcome);
  KJ_EXPECT(current->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES);
  KJ_EXPECT(!current->lastExchangeWroteRequest());
  KJ_EXPECT(KJ_ASSERT_NONNULL(test::bytesBeforeEnd(env, env.peer->getStream())) == 0);
}

KJ_TEST("a deep chain (1 and 8 fetchers over released streams): a whole response sent while "
        "idle, then a request in the same turn: the gate still refuses it, nothing written") {
  // SETTLE_TURNS is 16 whatever the depth; the byte crosses the links depth-first (each link's
  // continuation runs before the gate's next evalLater()), so depth does not defeat the gate.
  for (auto kind: {Kind::PIPE, Kind::NO_FD_PIPE, Kind::TLS_LIKE, Kind::TCP}) {
    deepChainGate(kind, 1);
    deepChainGate(kind, 8);
  }
}

void finWhileIdle(Kind kind, unsigned depth) {
  KJ_CONTEXT(kind, depth);
  Env env(kind);
  KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
  kj::Own<StreamFetcher> current = kj::mv(env.fetcher);
  for (unsigned i = 0; i < depth; i++) {
    current = kj::heap<StreamFetcher>(current->release(), env.table, env.settings());
  }
  env.settle();
  // The server's FIN reaches the kernel; the loop has not polled since.
  int fd = KJ_ASSERT_NONNULL(env.peer->getStream().getFd());
  KJ_ASSERT(::shutdown(fd, SHUT_WR) == 0);
  auto h = env.headers();
  kj::Maybe<kj::Exception> failure;
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
    auto req = current->request(kj::HttpMethod::GET, "/", h);
    req.body = nullptr;
    failure = env.failureOf(kj::mv(req.response));
  })) {
    failure = kj::mv(e);  // a plain socket is asked at once
  }
  auto& e = KJ_ASSERT_NONNULL(failure);
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(current->getCloseKind() == StreamFetcher::CloseKind::PEER_CLOSED_IDLE,
      current->getCloseKind(), e);
  KJ_EXPECT(!current->lastExchangeWroteRequest(), "not safe to retry, though nothing was sent");
  KJ_EXPECT(KJ_ASSERT_NONNULL(test::bytesBeforeEnd(env, env.peer->getStream())) == 0);
}

KJ_TEST("the server's FIN in the kernel, not yet polled, then a request: refused with nothing "
        "written (safe to retry) on a plain socket, the TLS-like wrapper with the timer, and "
        "fetchers over released sockets") {
  finWhileIdle(Kind::TCP, 0);
  finWhileIdle(Kind::TLS_LIKE, 0);
  finWhileIdle(Kind::TCP, 1);
  finWhileIdle(Kind::TCP, 3);
  finWhileIdle(Kind::TLS_LIKE, 2);
}

// =================================================================================================
// Streams that are not kj's sockets: idle watch, gate, uploads

void idleAndGate(Kind kind, bool withTimer) {
  KJ_CONTEXT(kind, withTimer);
  {
    // Bytes while idle (the loop polled): dropped as unsolicited.
    Env env(kind, withTimer);
    KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
    env.settle();
    auto junk = env.peer->sendLater("junk").eagerlyEvaluate([](kj::Exception&&) {});
    env.waitFor([&]() { return env.fetcher->getState() == State::CLOSED; });
    KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES,
        env.fetcher->getCloseKind());
  }
  {
    // The server closing while idle: noticed.
    Env env(kind, withTimer);
    KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
    env.settle();
    env.peer->getStream().shutdownWrite();
    env.waitFor([&]() { return env.fetcher->getState() == State::CLOSED; });
    KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::PEER_CLOSED_IDLE,
        env.fetcher->getCloseKind());
  }
  if (kind == Kind::PIPE || kind == Kind::NO_FD_PIPE) {
    // The gate: on a pipe a write reaches the idle read at once, and the request that follows
    // in the same turn is refused with nothing written.
    Env env(kind, withTimer);
    KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
    env.settle();
    auto junk = env.peer->sendLater("X").eagerlyEvaluate([](kj::Exception&&) {});
    auto h = env.headers();
    auto req = env.fetcher->request(kj::HttpMethod::GET, "/late", h);
    req.body = nullptr;
    auto e = env.failureOf(kj::mv(req.response));
    KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
    KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UNSOLICITED_BYTES,
        env.fetcher->getCloseKind());
    KJ_EXPECT(!env.fetcher->lastExchangeWroteRequest());
    KJ_EXPECT(KJ_ASSERT_NONNULL(test::bytesBeforeEnd(env, env.peer->getStream())) == 0,
        "the request was written on a poisoned connection");
  }
  if (kind == Kind::TLS_LIKE && withTimer) {
    // The gate with the timer: bytes the kernel holds, not yet polled, are waited for.
    Env env(kind, withTimer);
    KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
    env.settle();
    int fd = KJ_ASSERT_NONNULL(env.peer->getStream().getFd());
    KJ_ASSERT(::write(fd, "X", 1) == 1);
    auto h = env.headers();
    auto req = env.fetcher->request(kj::HttpMethod::GET, "/late", h);
    req.body = nullptr;
    auto e = env.failureOf(kj::mv(req.response));
    KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
    KJ_EXPECT(KJ_ASSERT_NONNULL(test::bytesBeforeEnd(env, env.peer->getStream())) == 0,
        "the request was written on a poisoned connection");
  }
}

KJ_TEST("over pipes, a wrapper without a descriptor and the TLS-like wrapper, with and without "
        "Settings::timer: bytes and closes while idle are noticed; the gate refuses a request "
        "after bytes it can see, writing nothing") {
  for (auto kind: ALL_KINDS) {
    idleAndGate(kind, true);
    idleAndGate(kind, false);
  }
}

void uploads(Kind kind, bool withTimer) {
  KJ_CONTEXT(kind, withTimer);
  Env env(kind, withTimer);
  auto h = env.headers();
  {
    // Expect: 100-continue: the 100 is skipped, the body follows, the connection is reused.
    auto eh = h.clone();
    eh.add("Expect", "100-continue");
    auto req = env.fetcher->request(kj::HttpMethod::PUT, "/continue", eh, uint64_t(4));
    auto head = env.peer->readHead();
    KJ_EXPECT(contains(head, "Expect: 100-continue"), head);
    env.peer->send("HTTP/1.1 100 Continue\r\n\r\n");
    auto writing = req.body->write("body", 4);
    KJ_EXPECT(env.peer->readExactly(4) == "body");
    env.bounded(kj::mv(writing));
    req.body = nullptr;
    auto sending = env.peer->sendLater(OK);
    auto response = env.bounded(kj::mv(req.response));
    KJ_EXPECT(response.statusCode == 200);
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "ok");
    env.bounded(kj::mv(sending));
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.fetcher->getState());
  }
  KJ_EXPECT(env.get(*env.fetcher, "/after-continue") == "ok");
  {
    // Early answer: the server answers a 10-byte upload after its head; the body, written
    // afterwards, is discarded; the connection is not reused, and its body never reaches the
    // server as a request.
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/early", h, uint64_t(10));
    auto head = env.peer->readHead();
    auto sending = env.peer->sendLater(
        "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig");
    auto response = env.bounded(kj::mv(req.response));
    KJ_EXPECT(response.statusCode == 413);
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "big");
    env.bounded(kj::mv(sending));
    KJ_EXPECT(env.fetcher->getState() == State::CLOSED, env.fetcher->getState());
    KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::REQUEST_INCOMPLETE,
        env.fetcher->getCloseKind(), env.fetcher->getCloseReason().orDefault("(none)"));
    // The caller writes the rest anyway: the writes succeed and nothing reaches the server.
    env.bounded(req.body->write("0123456789", 10));
    req.body = nullptr;
    response.body = nullptr;
    KJ_IF_SOME(n, test::bytesBeforeEnd(env, env.peer->getStream())) {
      KJ_EXPECT(n == 0, "the discarded body reached the server", n);
    } else {
      KJ_FAIL_EXPECT("the connection was not closed");
    }
  }
}

KJ_TEST("uploads on every transport, with and without the timer: Expect: 100-continue then "
        "reuse; an early answer closes the connection and the late body never reaches it") {
  for (auto kind: ALL_KINDS) {
    uploads(kind, true);
    uploads(kind, false);
  }
}

// =================================================================================================
// WebSockets over streams that are not kj's sockets

void webSocket(Kind kind, bool destroyFetcher, bool abort, bool disconnect = false) {
  KJ_CONTEXT(kind, destroyFetcher, abort, disconnect);
  Env env(kind);
  auto h = env.headers();
  KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  auto head = env.peer->readHead();
  // The 101 and two frames in one write.
  auto glued = kj::str(switching(head), textFrame("one"), textFrame("two"));
  auto sending = env.peer->sendLater(glued);
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  KJ_EXPECT(env.fetcher->getCloseKind() == StreamFetcher::CloseKind::UPGRADED);
  auto ws = kj::mv(KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>()));
  if (destroyFetcher) env.fetcher = nullptr;
  auto m1 = env.bounded(ws->receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(m1.tryGet<kj::String>()) == "one");
  auto m2 = env.bounded(ws->receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(m2.tryGet<kj::String>()) == "two");
  env.bounded(kj::mv(sending));
  // Client to server.
  auto out = ws->send(kj::StringPtr("hi"));
  auto frame = env.peer->readExactly(8);
  KJ_EXPECT(unmask(frame) == "hi");
  env.bounded(kj::mv(out));
  if (disconnect) {
    // disconnect(): the write side ends (no Close frame), which the server reads as the end.
    ws->disconnect();
    KJ_EXPECT(env.peer->sawEof(), "disconnect() did not reach the server");
    return;
  }
  if (abort) {
    auto pending = ws->receive();
    KJ_EXPECT(!pending.poll(env.ws));
    ws->abort();
    auto e = env.failureOf(kj::mv(pending));
    (void)e;
    return;
  }
  // The close handshake, server first.
  auto closing = env.peer->sendLater("\x88\x02\x03\xe8");
  auto m3 = env.bounded(ws->receive());
  auto& close = KJ_ASSERT_NONNULL(m3.tryGet<kj::WebSocket::Close>());
  KJ_EXPECT(close.code == 1000);
  env.bounded(kj::mv(closing));
  auto reply = ws->close(1000, "");
  auto closeFrame = env.peer->readExactly(8);
  KJ_EXPECT((closeFrame[0] & 0xff) == 0x88, closeFrame[0]);
  env.bounded(kj::mv(reply));
  ws = nullptr;
  KJ_EXPECT(env.peer->sawEof(), "the upgraded connection stayed open after the WebSocket went");
}

void webSocketAfterRelease(Kind kind) {
  KJ_CONTEXT(kind);
  Env env(kind);
  KJ_ASSERT(env.get(*env.fetcher, "/") == "ok");
  env.settle();
  auto second = kj::heap<StreamFetcher>(env.fetcher->release(), env.table, env.settings());
  env.fetcher = nullptr;
  KJ_ASSERT(env.get(*second, "/2") == "ok");
  auto h = env.headers();
  auto handshake = second->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  auto head = env.peer->readHead();
  auto glued = kj::str(switching(head), textFrame("one"), textFrame("two"));
  auto sending = env.peer->sendLater(glued);
  auto response = env.bounded(kj::mv(handshake));
  KJ_ASSERT(response.statusCode == 101);
  auto ws = kj::mv(KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>()));
  second = nullptr;
  auto m1 = env.bounded(ws->receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(m1.tryGet<kj::String>()) == "one");
  auto m2 = env.bounded(ws->receive());
  KJ_EXPECT(KJ_ASSERT_NONNULL(m2.tryGet<kj::String>()) == "two");
  env.bounded(kj::mv(sending));
  auto out = ws->send(kj::StringPtr("hi"));
  KJ_EXPECT(unmask(env.peer->readExactly(8)) == "hi");
  env.bounded(kj::mv(out));
}

KJ_TEST("a WebSocket through a StreamFetcher over a released stream: frames glued to the 101, "
        "both directions, both fetchers gone") {
  for (auto kind: ALL_KINDS) webSocketAfterRelease(kind);
}

KJ_TEST("WebSockets on every transport: frames glued to the 101, both directions, the close "
        "handshake; the fetcher destroyed while the WebSocket lives; abort(); disconnect()") {
  for (auto kind: ALL_KINDS) {
    webSocket(kind, false, false);
    webSocket(kind, true, false);
    webSocket(kind, false, true);
    webSocket(kind, true, false, true);
  }
}

void receiveRaced(Kind kind) {
  KJ_CONTEXT(kind);
  Env env(kind);
  auto h = env.headers();
  auto handshake = env.fetcher->openWebSocket("/ws", h).eagerlyEvaluate(nullptr);
  auto head = env.peer->readHead();
  auto accept = switching(head);
  auto sending = env.peer->sendLater(accept);
  auto response = env.bounded(kj::mv(handshake));
  env.bounded(kj::mv(sending));
  KJ_ASSERT(response.statusCode == 101);
  auto& ws = *KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>());
  bool timedOut = env.bounded(ws.receive().then([](kj::WebSocket::Message&&) { return false; })
      .exclusiveJoin(env.timer.afterDelay(10 * kj::MILLISECONDS).then([]() { return true; })));
  KJ_ASSERT(timedOut);
  auto frame = env.peer->sendLater("\x81\x03hey").eagerlyEvaluate([](kj::Exception&&) {});
  auto got = env.bounded(ws.receive().then([](kj::WebSocket::Message&& m) {
    return kj::str(KJ_ASSERT_NONNULL(m.tryGet<kj::String>()));
  }, [](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); }));
  KJ_EXPECT(got == "hey", got);
}

KJ_TEST("a WebSocket receive() raced against a timer, then called again, works over a wrapper "
        "without a descriptor and the TLS-like wrapper too") {
  receiveRaced(Kind::NO_FD_TCP);
  receiveRaced(Kind::NO_FD_PIPE);
  receiveRaced(Kind::TLS_LIKE);
}

}  // namespace
}  // namespace sockfetch
