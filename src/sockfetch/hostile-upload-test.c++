// Adversarial upstreams against request bodies (uploads): real loopback TCP peers (and unix
// socket pairs) that stop reading, answer early, reset mid-body, refuse `Expect: 100-continue`,
// or close an idle connection just before it is reused, against StreamFetcher and
// ConnectionPool. Each test checks the guard's promises for uploads: a connection is reused only
// if the whole request was written and the response fully framed, the body arrives once and
// intact (a retried one too), a cancelled or failed upload closes its connection (and the pool
// stops counting it), nothing hangs (every wait is bounded), and every error says what happened.
//
#include "pool.h"
#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <algorithm>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

namespace sockfetch {
namespace {

using test::contains;
using Kind = StreamFetcher::CloseKind;
using State = StreamFetcher::State;

constexpr size_t BIG = 16 << 20;
// More than a loopback socket's (or a unix socket pair's) buffers hold on both ends together, so
// an upload this big to a server that stops reading gets stuck in a write of kj's.

constexpr kj::StringPtr OK_HELLO = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"_kj;

kj::byte patternAt(size_t i) {
  return 'a' + (i * 7 + i / 4093) % 26;
}

kj::Array<kj::byte> pattern(size_t n) {
  // Bytes whose position shows: a byte lost, duplicated or moved changes what follows it.
  auto result = kj::heapArray<kj::byte>(n);
  for (size_t i = 0; i < n; i++) result[i] = patternAt(i);
  return result;
}

kj::ArrayPtr<const kj::byte> bigPattern() {
  // pattern(BIG), made once: many tests need it.
  static const kj::Array<kj::byte> big = pattern(BIG);
  return big;
}

bool same(kj::ArrayPtr<const kj::byte> a, kj::ArrayPtr<const kj::byte> b) {
  return a.size() == b.size() && memcmp(a.begin(), b.begin(), a.size()) == 0;
}

// =================================================================================================
// Wire: the server end of one connection, every read bounded.

class Wire {
public:
  Wire(test::LoopEnv& env, kj::Own<kj::AsyncIoStream> stream): env(env), stream(kj::mv(stream)) {}

  size_t fill() {
    // Reads whatever arrives next (bounded): 0 at the end of the stream. A reset throws.
    kj::byte chunk[1 << 16];
    size_t n = env.bounded(kj::evalNow([&]() {
      return stream->tryRead(chunk, 1, sizeof(chunk));
    }));
    buffer.addAll(chunk, chunk + n);
    return n;
  }

  size_t available() const { return buffer.size() - pos; }

  kj::String head() {
    // Reads through the next blank line.
    for (;;) {
      auto start = buffer.begin() + pos;
      for (size_t i = 0; i + 4 <= available(); i++) {
        if (memcmp(start + i, "\r\n\r\n", 4) == 0) return take(i + 4);
      }
      KJ_ASSERT(fill() > 0, "the client closed the connection before a full request head");
    }
  }

  kj::String take(size_t n) {
    while (available() < n) {
      KJ_ASSERT(fill() > 0, "the client closed the connection early", n, available());
    }
    auto result = kj::heapString(reinterpret_cast<const char*>(buffer.begin() + pos), n);
    advance(n);
    return result;
  }

  bool consume(kj::ArrayPtr<const kj::byte> expected) {
    // Reads exactly expected.size() bytes; true if they are exactly `expected`.
    bool same = true;
    size_t done = 0;
    while (done < expected.size()) {
      if (available() == 0) {
        KJ_ASSERT(fill() > 0, "the client closed the connection early", done, expected.size());
      }
      size_t k = kj::min(available(), expected.size() - done);
      if (memcmp(buffer.begin() + pos, expected.begin() + done, k) != 0) same = false;
      advance(k);
      done += k;
    }
    return same;
  }

  kj::Vector<kj::byte> chunkedBody(size_t* chunks = nullptr) {
    // Reads a chunked body through its terminator (no trailers) and returns it de-chunked.
    kj::Vector<kj::byte> body;
    size_t count = 0;
    for (;;) {
      auto line = takeLine();
      size_t size = strtoul(line.cStr(), nullptr, 16);
      if (size == 0) {
        KJ_ASSERT(take(2) == "\r\n", "chunked request body without its final CRLF");
        break;
      }
      ++count;
      while (available() < size) {
        KJ_ASSERT(fill() > 0, "the client closed the connection inside a chunk");
      }
      body.addAll(buffer.begin() + pos, buffer.begin() + pos + size);
      advance(size);
      KJ_ASSERT(take(2) == "\r\n", "a chunk not followed by CRLF");
    }
    if (chunks != nullptr) *chunks = count;
    return body;
  }

  bool quietFor(kj::Duration d = 30 * kj::MILLISECONDS) {
    // True if the client sends nothing (and does not close) for `d`.
    if (available() > 0 || eof) return false;
    kj::byte c;
    auto read = kj::evalNow([&]() { return stream->tryRead(&c, 1, 1); })
        .then([](size_t n) { return n == 0 ? 1 : 2; }, [](kj::Exception&&) { return 1; });
    int outcome = read.exclusiveJoin(env.timer.afterDelay(d).then([]() { return 0; })).wait(env.ws);
    if (outcome == 2) buffer.add(c);
    if (outcome == 1) eof = true;
    return outcome == 0;
  }

  kj::Maybe<size_t> drainToClose() {
    // Reads (and drops) everything until the client closes (FIN or RST), within the limit:
    // how many bytes came first (buffered ones included), or null if it did not close.
    size_t count = available();
    advance(available());
    if (eof) return count;
    auto chunk = kj::heapArray<kj::byte>(1 << 16);
    auto deadline = env.timer.now() + env.limit;
    while (env.timer.now() < deadline) {
      auto read = kj::evalNow([&]() { return stream->tryRead(chunk.begin(), 1, chunk.size()); })
          .then([](size_t n) -> int64_t { return n; },
                [](kj::Exception&& e) -> int64_t {
        return e.getType() == kj::Exception::Type::DISCONNECTED ? 0 : -1;
      }).exclusiveJoin(env.timer.afterDelay(deadline - env.timer.now()).then([]() {
        return int64_t(-1);
      }));
      int64_t n = read.wait(env.ws);
      if (n < 0) return nullptr;
      if (n == 0) {
        eof = true;
        return count;
      }
      count += n;
    }
    return nullptr;
  }

  void send(kj::StringPtr bytes) { env.bounded(writeAll(*stream, bytes.asBytes())); }

  void reset() {
    // Closes with SO_LINGER 0: the kernel sends RST, not FIN.
    int fd = KJ_ASSERT_NONNULL(stream->getFd());
    struct linger lin = {1, 0};
    KJ_SYSCALL(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lin, sizeof(lin)));
    stream = nullptr;
  }

  void close() { stream = nullptr; }

private:
  test::LoopEnv& env;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Vector<kj::byte> buffer;
  size_t pos = 0;
  bool eof = false;

  void advance(size_t n) {
    pos += n;
    if (pos == buffer.size()) {
      buffer.clear();
      pos = 0;
    } else if (pos > (1 << 20)) {
      kj::Vector<kj::byte> rest(buffer.size() - pos);
      rest.addAll(buffer.begin() + pos, buffer.end());
      buffer = kj::mv(rest);
      pos = 0;
    }
  }

  kj::String takeLine() {
    for (;;) {
      auto start = buffer.begin() + pos;
      for (size_t i = 0; i < available(); i++) {
        if (start[i] == '\n') return take(i + 1);
      }
      KJ_ASSERT(fill() > 0, "the client closed the connection inside a chunk-size line");
    }
  }
};

void forget(kj::Promise<void>) {}
// Drops a promise (cancelling it) where only whether making it threw matters.

kj::Maybe<kj::Exception> outcomeOf(test::LoopEnv& env, kj::Promise<void> promise) {
  // Waits (bounded) for `promise`: null if it succeeded, else why it failed.
  return env.bounded(promise.then([]() -> kj::Maybe<kj::Exception> { return nullptr; },
      [](kj::Exception&& e) -> kj::Maybe<kj::Exception> { return kj::mv(e); }));
}

template <typename Func>
kj::Maybe<kj::Exception> writeOutcome(test::LoopEnv& env, Func&& write) {
  // A write issued now, whether it throws at once or fails its promise.
  return outcomeOf(env, kj::evalNow(kj::fwd<Func>(write)));
}

template <typename Func>
unsigned forEachTeardownOrder(Func&& func) {
  // Calls func(order, i) for each order of four teardown steps (0: the write, 1: the body stream,
  // 2: the response promise, 3: the client) in which the write goes before the body it writes
  // to; returns how many there were (12).
  int order[4] = {0, 1, 2, 3};
  unsigned count = 0;
  do {
    auto at = [&](int step) { return std::find(order, order + 4, step) - order; };
    if (at(0) > at(1)) continue;
    func(kj::arrayPtr<const int>(order, 4), count++);
  } while (std::next_permutation(order, order + 4));
  return count;
}

struct Upload {
  // A request whose body is being written. Members in the order they may be destroyed safely.
  kj::ArrayPtr<const kj::byte> data;
  kj::Own<kj::AsyncOutputStream> body;
  kj::Promise<kj::HttpClient::Response> response = nullptr;
  kj::Promise<void> write = nullptr;  // the whole body, in one write
};

Upload startUpload(test::LoopEnv& env, kj::HttpClient& client, bool chunked,
    size_t declaredExtra = 0) {
  // A POST of BIG bytes in one write; a fixed-length body declares `declaredExtra` more.
  Upload upload;
  upload.data = bigPattern();
  kj::Maybe<uint64_t> expected;
  if (!chunked) expected = uint64_t(BIG + declaredExtra);
  auto request = client.request(kj::HttpMethod::POST, "/upload", env.headers(), expected);
  upload.body = kj::mv(request.body);
  upload.response = kj::mv(request.response);
  upload.write = writeAll(*upload.body, upload.data).eagerlyEvaluate(nullptr);
  return upload;
}

// =================================================================================================
// StreamFetcher over one connection

struct Env: public test::LoopEnv {
  kj::Own<StreamFetcher> fetcher;
  kj::Own<Wire> wire;

  explicit Env(bool unix = false) {
    kj::Own<kj::AsyncIoStream> client;
    kj::Own<kj::AsyncIoStream> server;
    if (unix) {
      auto pair = io.provider->newTwoWayPipe();  // a unix socket pair
      client = kj::mv(pair.ends[0]);
      server = kj::mv(pair.ends[1]);
    } else {
      auto transport = test::tcpTransport(io);
      client = kj::mv(transport.client);
      server = kj::mv(transport.server);
    }
    StreamFetcher::Settings settings;
    settings.timer = timer;
    fetcher = kj::heap<StreamFetcher>(kj::mv(client), table, kj::mv(settings));
    wire = kj::heap<Wire>(*this, kj::mv(server));
  }

  kj::StringPtr reason() {
    KJ_IF_SOME(r, fetcher->getCloseReason()) return r;
    return "(not closed)";
  }

  Upload stuckUpload(bool chunked, size_t declaredExtra = 0) {
    // An upload whose head the server read, after which it stopped reading: the write is stuck.
    auto upload = startUpload(*this, *fetcher, chunked, declaredExtra);
    KJ_ASSERT(wire->head().startsWith("POST /upload "));
    settle();
    KJ_ASSERT(!upload.write.poll(ws), "the socket buffers took the whole body: make BIG bigger");
    KJ_ASSERT(fetcher->getState() == State::BUSY);
    return upload;
  }

  kj::Maybe<kj::Exception> nextRequestFailure() {
    return kj::runCatchingExceptions([&]() {
      fetcher->request(kj::HttpMethod::GET, "/next", headers());
    });
  }

  void exchangeReused(kj::StringPtr url) {
    // A GET on the same connection: the server sees exactly its head, and the connection is
    // reused after.
    auto req = fetcher->request(kj::HttpMethod::GET, url, headers());
    req.body = nullptr;
    auto head = wire->head();
    KJ_EXPECT(head.startsWith(kj::str("GET ", url, " ")), head);
    KJ_EXPECT(wire->quietFor(), "bytes followed the request head");
    wire->send(OK_HELLO);
    auto r = bounded(kj::mv(req.response));
    KJ_EXPECT(bounded(r.body->readAllText()) == "hello");
    KJ_EXPECT(fetcher->getState() == State::IDLE, reason());
  }
};

void cancelStuckUpload(bool unix, bool chunked) {
  Env env(unix);
  auto upload = env.stuckUpload(chunked);
  upload.response = nullptr;  // the caller gives up on the response
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED, env.fetcher->getState());
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::ABANDONED, env.fetcher->getCloseKind());
  // The caller still holds the body and its stuck write, but the connection is closed at once:
  // the write fails instead of waiting for a server that will never read, and the server sees
  // the connection end.
  KJ_IF_SOME(e, outcomeOf(env, kj::mv(upload.write))) {
    KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  } else {
    KJ_FAIL_EXPECT("a stuck upload to a server that never reads succeeded");
  }
  KJ_EXPECT(env.wire->drainToClose() != nullptr, "the abandoned connection was not closed");
  KJ_IF_SOME(e, env.nextRequestFailure()) {
    KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
    KJ_EXPECT(contains(e.getDescription(), "cancelled"), e);
  } else {
    KJ_FAIL_EXPECT("a request was accepted on an abandoned connection");
  }
}

KJ_TEST("hostile upload: cancelling the response of an upload stuck on a zero window closes it") {
  cancelStuckUpload(false, false);
  cancelStuckUpload(false, true);
  cancelStuckUpload(true, false);
  cancelStuckUpload(true, true);
}

void writeAfterFailedWrite(bool chunked) {
  Env env;
  auto upload = env.stuckUpload(chunked, 100);  // a fixed-length body has 100 bytes still to go
  upload.response = nullptr;
  KJ_EXPECT(outcomeOf(env, kj::mv(upload.write)) != nullptr);
  KJ_ASSERT(env.fetcher->getState() == State::CLOSED);
  // The caller writes again (say, a retry loop around its writes). The connection was closed
  // because the request was cancelled; the error must say so, as the one for a write after a
  // clean failure does ("the connection was closed (...)"), and as a failed promise.
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { forget(upload.body->write("more", 4)); })) {
    KJ_FAIL_EXPECT("write() threw instead of returning a failed promise",
        chunked ? "chunked" : "fixed-length", e.getDescription());
  }
  KJ_IF_SOME(e, writeOutcome(env, [&]() { return upload.body->write("more", 4); })) {
    KJ_EXPECT(contains(e.getDescription(), "connection was closed"),
        chunked ? "chunked" : "fixed-length", e);
  } else {
    KJ_FAIL_EXPECT("a write after the exchange failed succeeded");
  }
}

KJ_TEST("hostile upload: a write after a failed upload write says why the connection is gone") {
  // When a body write fails (here: it was stuck, and the caller cancelled the response, so the
  // connection was shut down), kj-http's HttpOutputStream keeps `writeInProgress` set forever:
  // a later write on the same body stream, passed to kj, would throw kj-http's internal
  // "concurrent write()s not allowed", synchronously. It must fail as a promise, with the
  // reason.
  writeAfterFailedWrite(false);
  writeAfterFailedWrite(true);
}

KJ_TEST("hostile upload: a fixed-length body dropped after its stuck write was cancelled") {
  // The server still waits for the rest, so no response can come: the response fails at once
  // with the reason, and the connection is closed.
  Env env;
  auto upload = env.stuckUpload(false);
  upload.write = nullptr;  // cancelled mid-write: some of the body reached the server
  upload.body = nullptr;
  KJ_IF_SOME(e, outcomeOf(env, upload.response.ignoreResult())) {
    KJ_EXPECT(contains(e.getDescription(), "dropped after"), e);
  } else {
    KJ_FAIL_EXPECT("a response arrived for a request that was never sent in full");
  }
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::ABANDONED, env.fetcher->getCloseKind());
  KJ_EXPECT(env.wire->drainToClose() != nullptr, "the abandoned connection was not closed");
}

KJ_TEST("hostile upload: a chunked body dropped after its stuck write was cancelled") {
  // Same as above with a chunked body. kj-http cannot write the terminator (a write of the body
  // was cancelled, so it aborts the body), and the server waits for the rest of a chunk and
  // never answers: the response must fail at once with the reason, rather than wait forever
  // with the fetcher BUSY and its connection open (a pool would keep counting it).
  Env env;
  env.limit = 500 * kj::MILLISECONDS;
  auto upload = env.stuckUpload(true);
  upload.write = nullptr;
  upload.body = nullptr;
  env.settle();
  auto stateBefore = env.fetcher->getState();  // BUSY: the exchange is neither over nor failed
  auto failed = upload.response.then([](kj::HttpClient::Response&&) { return false; },
      [](kj::Exception&&) { return true; });
  bool ended = failed.exclusiveJoin(env.timer.afterDelay(env.limit).then([]() {
    return false;
  })).wait(env.ws);
  KJ_EXPECT(ended, "the response of an abandoned chunked upload never failed", stateBefore,
      env.limit);
  KJ_EXPECT(stateBefore == State::CLOSED, stateBefore);
}

KJ_TEST("hostile upload: a fetcher destroyed mid-upload lets the upload finish, then closes") {
  Env env;
  auto upload = env.stuckUpload(false);
  env.fetcher = nullptr;
  // The server catches up: every byte arrives, once and in order, and the response comes back.
  KJ_EXPECT(env.wire->consume(upload.data), "the body arrived changed");
  KJ_EXPECT(outcomeOf(env, kj::mv(upload.write)) == nullptr);
  upload.body = nullptr;
  env.wire->send(OK_HELLO);
  auto r = env.bounded(kj::mv(upload.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  r.body = nullptr;
  // Nobody can reuse it: the connection closes, with nothing more sent.
  KJ_EXPECT(env.wire->drainToClose().orDefault(1000) == 0, "the connection was not closed cleanly");
}

KJ_TEST("hostile upload: a stuck upload's parts destroyed in any order close the connection") {
  // write, body, response promise, fetcher. Nothing hangs, nothing is touched after it is freed
  // (ASan), the server sees the connection end.
  KJ_EXPECT(forEachTeardownOrder([](kj::ArrayPtr<const int> order, unsigned i) {
    Env env;
    auto upload = env.stuckUpload(i % 2 == 1);
    for (int step: order) {
      switch (step) {
        case 0: upload.write = nullptr; break;
        case 1: upload.body = nullptr; break;
        case 2: upload.response = nullptr; break;
        case 3: env.fetcher = nullptr; break;
      }
      env.settle(2 * kj::MILLISECONDS);
    }
    KJ_EXPECT(env.wire->drainToClose() != nullptr, "not closed", order);
  }) == 12);
}

KJ_TEST("hostile upload: a full early answer, then a reset mid-upload, never reuses") {
  // The server answers (keep-alive) after the head, then resets instead of reading the rest.
  Env env;
  auto upload = env.stuckUpload(false);
  env.wire->send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
  auto r = env.bounded(kj::mv(upload.response));
  KJ_EXPECT(r.statusCode == 200);
  env.wire->reset();
  KJ_EXPECT(outcomeOf(env, kj::mv(upload.write)) != nullptr,
      "the whole body was written to a connection that was reset");
  auto read = kj::runCatchingExceptions([&]() { env.bounded(r.body->readAllText()); });
  KJ_EXPECT(env.fetcher->getState() == State::CLOSED, env.fetcher->getState());
  (void)read;  // the body may or may not survive the reset; either way the connection is gone
  auto kind = env.fetcher->getCloseKind();
  KJ_EXPECT(kind == Kind::REQUEST_INCOMPLETE || kind == Kind::FAILED, kind, env.reason());
  KJ_IF_SOME(e, env.nextRequestFailure()) {
    KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
    KJ_EXPECT(contains(e.getDescription(), env.reason()), e);
  } else {
    KJ_FAIL_EXPECT("a request was accepted on a connection whose upload never finished");
  }
}

KJ_TEST("hostile upload: a 417 to Expect: 100-continue keeps the body off the wire") {
  // The server refuses the expectation without reading the body (and keeps the connection):
  // the body, written after, must never reach it, since it would read it as the next request.
  Env env;
  auto lookalike = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"_kj;
  auto h = env.headers();
  h.add("Expect", "100-continue");
  auto req = env.fetcher->request(kj::HttpMethod::POST, "/upload", h, uint64_t(lookalike.size()));
  KJ_EXPECT(contains(env.wire->head(), "Expect: 100-continue"));
  env.wire->send("HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n");
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(r.statusCode == 417);
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "");
  KJ_EXPECT(env.fetcher->getCloseKind() == Kind::REQUEST_INCOMPLETE, env.fetcher->getCloseKind(),
      env.reason());
  // The caller may still write the body (a proxy pumping its client's upload does): it is taken
  // and discarded, never sent.
  KJ_IF_SOME(e, writeOutcome(env, [&]() { return writeAll(*req.body, lookalike.asBytes()); })) {
    KJ_FAIL_EXPECT("a write after the answer failed, rather than being discarded", e);
  }
  req.body = nullptr;
  KJ_EXPECT(env.wire->drainToClose().orDefault(1000) == 0,
      "the body reached a server that refused it, or the connection stayed open");
}

KJ_TEST("hostile upload: 100 Continue, then a body larger than the socket buffers, then reuse") {
  Env env;
  auto h = env.headers();
  h.add("Expect", "100-continue");
  auto data = bigPattern();
  auto req = env.fetcher->request(kj::HttpMethod::PUT, "/big", h, uint64_t(data.size()));
  KJ_EXPECT(env.wire->head().startsWith("PUT /big "));
  env.wire->send("HTTP/1.1 100 Continue\r\n\r\n");
  auto write = writeAll(*req.body, data).eagerlyEvaluate(nullptr);
  KJ_EXPECT(env.wire->consume(data), "the body arrived changed");
  KJ_EXPECT(outcomeOf(env, kj::mv(write)) == nullptr);
  req.body = nullptr;
  KJ_EXPECT(env.wire->quietFor(), "bytes followed the body");
  env.wire->send("HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok");
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(r.statusCode == 201);
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "ok");
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.reason());
  env.exchangeReused("/next");
}

kj::Promise<void> writeSmallPieces(kj::AsyncOutputStream& body, kj::ArrayPtr<const kj::byte> data,
    size_t offset, unsigned i) {
  // Writes `data` in pieces of 1 to 9 bytes, each after the previous one completed.
  if (offset == data.size()) return kj::READY_NOW;
  size_t n = kj::min(size_t(1 + i % 9), data.size() - offset);
  return body.write(data.begin() + offset, n).then([&body, data, offset, n, i]() {
    return writeSmallPieces(body, data, offset + n, i + 1);
  });
}

void chunkedUpload(bool unix) {
  Env env(unix);
  // Many small writes: as many chunks, one terminator.
  {
    auto data = pattern(9000);
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/small", env.headers());
    // Read while it is written (a unix socket's buffer holds few small writes), and drop the
    // stream once the last write is done: kj writes the terminator.
    auto write = writeSmallPieces(*req.body, data, 0, 0).then([&req]() { req.body = nullptr; })
        .eagerlyEvaluate(nullptr);
    KJ_EXPECT(env.wire->head().startsWith("POST /small "));
    size_t chunks = 0;
    auto body = env.wire->chunkedBody(&chunks);
    KJ_EXPECT(outcomeOf(env, kj::mv(write)) == nullptr);
    KJ_EXPECT(same(body, data), "the chunked body arrived changed");
    KJ_EXPECT(chunks == 1800, chunks);
    KJ_EXPECT(env.wire->quietFor(), "bytes followed the terminator");
    env.wire->send(OK_HELLO);
    auto r = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.reason());
  }
  // One huge write: one chunk, cut by the kernel wherever its buffers fill.
  {
    auto data = bigPattern();
    auto req = env.fetcher->request(kj::HttpMethod::POST, "/huge", env.headers());
    auto write = writeAll(*req.body, data).eagerlyEvaluate(nullptr);
    KJ_EXPECT(env.wire->head().startsWith("POST /huge "));
    // Read the body while it is written; drop the stream once the write is done.
    auto finish = write.then([&req]() { req.body = nullptr; }).eagerlyEvaluate(nullptr);
    size_t chunks = 0;
    auto body = env.wire->chunkedBody(&chunks);
    env.bounded(kj::mv(finish));
    KJ_EXPECT(same(body, data), "the chunked body arrived changed");
    KJ_EXPECT(chunks == 1, chunks);
    KJ_EXPECT(env.wire->quietFor(), "bytes followed the terminator");
    env.wire->send(OK_HELLO);
    auto r = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
    KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.reason());
  }
  env.exchangeReused("/next");
  KJ_EXPECT(env.fetcher->getCompletedRequests() == 3);
}

KJ_TEST("hostile upload: chunked bodies of many small writes or one huge one, terminated once") {
  chunkedUpload(false);
  chunkedUpload(true);
}

KJ_TEST("hostile upload: bodies written as many pieces (empty ones too) arrive intact") {
  // A write of pieces: up to 16 go to the kernel in one sendmsg() and the rest (cut inside a
  // piece) to kj; more than 16 go to kj. Both framings, on both sides of that limit.
  Env env;
  auto data = bigPattern().slice(0, 6 << 20);  // more than the kernel takes in one sendmsg()
  for (bool chunked: {false, true}) {
    for (size_t count: {14, 15, 16, 17}) {
      // Cut points spread unevenly; every fourth piece is empty.
      auto pieces = kj::heapArray<kj::ArrayPtr<const kj::byte>>(count);
      size_t at = 0;
      for (size_t i = 0; i < count; i++) {
        size_t end = i + 1 == count ? data.size()
            : i % 4 == 3 ? at : kj::min(data.size(), at + (data.size() / count) * (1 + i % 3) / 2);
        pieces[i] = data.slice(at, end);
        at = end;
      }
      kj::Maybe<uint64_t> size;
      if (!chunked) size = uint64_t(data.size());
      auto url = kj::str("/pieces/", count, chunked ? "/chunked" : "/fixed");
      auto req = env.fetcher->request(kj::HttpMethod::POST, url, env.headers(), size);
      auto write = req.body->write(pieces).then([&req]() { req.body = nullptr; })
          .eagerlyEvaluate(nullptr);
      KJ_EXPECT(env.wire->head().startsWith(kj::str("POST ", url, " ")));
      if (chunked) {
        auto body = env.wire->chunkedBody();
        KJ_EXPECT(same(body, data), url);
      } else {
        KJ_EXPECT(env.wire->consume(data), url);
      }
      KJ_EXPECT(outcomeOf(env, kj::mv(write)) == nullptr, url);
      KJ_EXPECT(env.wire->quietFor(), "bytes followed the body", url);
      env.wire->send(OK_HELLO);
      auto r = env.bounded(kj::mv(req.response));
      KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
      KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.reason(), url);
    }
  }
}

KJ_TEST("hostile upload: a write on a finished exchange's body never reaches the next exchange") {
  Env env;
  auto req1 = env.fetcher->request(kj::HttpMethod::POST, "/one", env.headers(), uint64_t(3));
  env.bounded(writeAll(*req1.body, "abc"_kj.asBytes()));
  KJ_EXPECT(env.wire->head().startsWith("POST /one "));
  KJ_EXPECT(env.wire->take(3) == "abc");
  env.wire->send(OK_HELLO);
  auto r1 = env.bounded(kj::mv(req1.response));
  KJ_EXPECT(env.bounded(r1.body->readAllText()) == "hello");
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.reason());

  // The connection carries the next upload; the first body (still held) is written to again.
  auto req2 = env.fetcher->request(kj::HttpMethod::POST, "/two", env.headers(), uint64_t(5));
  KJ_EXPECT(env.wire->head().startsWith("POST /two "));
  KJ_EXPECT(writeOutcome(env, [&]() { return req1.body->write("X", 1); }) != nullptr,
      "a write past the end of a finished exchange's body succeeded");
  KJ_EXPECT(env.wire->quietFor(), "a finished exchange's body wrote into the next exchange");
  env.bounded(writeAll(*req2.body, "hello"_kj.asBytes()));
  req2.body = nullptr;
  KJ_EXPECT(env.wire->take(5) == "hello");
  KJ_EXPECT(env.wire->quietFor());
  env.wire->send(OK_HELLO);
  auto r2 = env.bounded(kj::mv(req2.response));
  KJ_EXPECT(env.bounded(r2.body->readAllText()) == "hello");
  KJ_EXPECT(env.fetcher->getState() == State::IDLE, env.reason());
}

// =================================================================================================
// ConnectionPool, its connections accepted and driven by the test

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

  kj::Own<Wire> accept() { return kj::heap<Wire>(*this, bounded(listener->accept())); }

  kj::Maybe<kj::Own<Wire>> tryAccept(kj::Duration d) {
    auto accepted = listener->accept().then([](kj::Own<kj::AsyncIoStream>&& s) {
      return kj::Maybe<kj::Own<kj::AsyncIoStream>>(kj::mv(s));
    }).exclusiveJoin(timer.afterDelay(d).then([]() {
      return kj::Maybe<kj::Own<kj::AsyncIoStream>>(nullptr);
    })).wait(ws);
    KJ_IF_SOME(s, accepted) {
      return kj::heap<Wire>(*this, kj::mv(s));
    }
    return nullptr;
  }

  kj::Own<Wire> servedGet(kj::StringPtr url) {
    // A GET on a new connection, answered and read to its end; the connection is then idle.
    auto req = pool->request(kj::HttpMethod::GET, url, headers());
    req.body = nullptr;
    auto wire = accept();
    KJ_EXPECT(wire->head().startsWith(kj::str("GET ", url, " ")));
    wire->send(OK_HELLO);
    auto r = bounded(kj::mv(req.response));
    KJ_EXPECT(bounded(r.body->readAllText()) == "hello");
    return wire;
  }

  Upload stuckUpload(bool chunked, kj::Own<Wire>& wire, size_t declaredExtra = 0) {
    // A streaming upload (too big to buffer) whose head the server read, then stopped reading.
    auto upload = startUpload(*this, *pool, chunked, declaredExtra);
    wire = accept();
    KJ_ASSERT(wire->head().startsWith("POST /upload "));
    settle();
    KJ_ASSERT(!upload.write.poll(ws), "the socket buffers took the whole body: make BIG bigger");
    return upload;
  }
};

void poolCancelStuckUpload(bool chunked) {
  PoolEnv env;
  kj::Own<Wire> wire;
  auto upload = env.stuckUpload(chunked, wire);
  KJ_EXPECT(env.pool->getOpenCount() == 1);
  upload.response = nullptr;
  KJ_EXPECT(outcomeOf(env, kj::mv(upload.write)) != nullptr,
      "a stuck upload to a server that never reads succeeded");
  env.settle();
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.droppedAbandoned == 1, stats.droppedAbandoned);
  KJ_EXPECT(env.pool->getOpenCount() == 0, "a cancelled upload's connection is still counted",
      env.pool->getOpenCount());
  KJ_EXPECT(env.pool->getIdleCount() == 0);
  KJ_EXPECT(wire->drainToClose() != nullptr, "the abandoned connection was not closed");
  // The next request gets a new connection, and only its own bytes.
  env.servedGet("/next");
  KJ_EXPECT(stats.connectionsOpened == 2, stats.connectionsOpened);
  KJ_EXPECT(stats.retries == 0);
}

KJ_TEST("hostile pool upload: a cancelled stuck upload's connection is closed and uncounted") {
  poolCancelStuckUpload(false);
  poolCancelStuckUpload(true);
}

KJ_TEST("hostile pool upload: a write after an upload's write failed says why") {
  // The ConnectionPool face of the StreamFetcher case above: its streaming body forwards to the
  // fetcher's.
  for (bool chunked: {false, true}) {
    PoolEnv env;
    kj::Own<Wire> wire;
    auto upload = env.stuckUpload(chunked, wire, 100);
    upload.response = nullptr;
    KJ_EXPECT(outcomeOf(env, kj::mv(upload.write)) != nullptr);
    KJ_IF_SOME(e, writeOutcome(env, [&]() { return upload.body->write("more", 4); })) {
      KJ_EXPECT(contains(e.getDescription(), "connection was closed") ||
          contains(e.getDescription(), "cancelled"), chunked ? "chunked" : "fixed-length", e);
    } else {
      KJ_FAIL_EXPECT("a write after the exchange failed succeeded");
    }
  }
}

KJ_TEST("hostile pool upload: a stuck upload's parts and the pool destroyed in any order") {
  KJ_EXPECT(forEachTeardownOrder([](kj::ArrayPtr<const int> order, unsigned i) {
    PoolEnv env;
    kj::Own<Wire> wire;
    auto upload = env.stuckUpload(i % 2 == 1, wire);
    for (int step: order) {
      switch (step) {
        case 0: upload.write = nullptr; break;
        case 1: upload.body = nullptr; break;
        case 2: upload.response = nullptr; break;
        case 3: env.pool = nullptr; break;
      }
      env.settle(2 * kj::MILLISECONDS);
    }
    KJ_EXPECT(wire->drainToClose() != nullptr, "not closed", order);
  }) == 12);
}

KJ_TEST("hostile pool upload: a buffered PUT retried after a reset mid-body arrives once, intact") {
  PoolEnv env;
  auto first = env.servedGet("/one");
  env.settle();
  auto data = pattern(40000);  // under maxReplayBodyBytes: buffered, replayable
  auto req = env.pool->request(kj::HttpMethod::PUT, "/put", env.headers(), uint64_t(data.size()));
  env.bounded(writeAll(*req.body, data));
  req.body = nullptr;
  // The reused connection takes the head and part of the body, then resets.
  KJ_EXPECT(first->head().startsWith("PUT /put "));
  KJ_EXPECT(first->consume(data.slice(0, 1000)));
  first->reset();
  // The retry, on a new connection: the whole body, once.
  auto second = env.accept();
  KJ_EXPECT(second->head().startsWith("PUT /put "));
  KJ_EXPECT(second->consume(data), "the retried body arrived changed");
  KJ_EXPECT(second->quietFor(), "bytes followed the retried body");
  second->send(OK_HELLO);
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.retries == 1, stats.retries);
  KJ_EXPECT(stats.droppedStale == 1, stats.droppedStale);
  KJ_EXPECT(stats.connectionsOpened == 2, stats.connectionsOpened);
  KJ_EXPECT(env.pool->getIdleCount() == 1);
}

kj::Own<Wire> closeIdleUnnoticed(PoolEnv& env) {
  // A connection served a request and went idle (its idle watch started); then the server closes
  // it, and the event loop does not run before the next request: only the kernel knows.
  auto wire = env.servedGet("/one");
  env.settle();
  KJ_ASSERT(env.pool->getIdleCount() == 1);
  wire->close();
  usleep(20 * 1000);  // the FIN reaches the client's kernel; the event loop does not run
  return wire;
}

KJ_TEST("hostile pool upload: a buffered POST meeting an unnoticed idle close is sent elsewhere") {
  // Control for the test below: nothing of the request reached the closed connection, so the
  // pool sends it on a new one, even though it is a POST.
  PoolEnv env;
  closeIdleUnnoticed(env);
  auto req = env.pool->request(kj::HttpMethod::POST, "/buffered", env.headers(), uint64_t(5));
  env.bounded(writeAll(*req.body, "hello"_kj.asBytes()));
  req.body = nullptr;
  auto wire = env.accept();
  KJ_EXPECT(wire->head().startsWith("POST /buffered "));
  KJ_EXPECT(wire->take(5) == "hello");
  wire->send(OK_HELLO);
  auto r = env.bounded(kj::mv(req.response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.droppedPeerClosedIdle == 1, stats.droppedPeerClosedIdle);
  KJ_EXPECT(stats.retries == 0, "sent once, counted as sent again", stats.retries);
}

KJ_TEST("hostile pool upload: a streaming upload meeting an unnoticed idle close is sent "
        "elsewhere") {
  // The same race with a body the pool does not buffer (chunked, or bigger than
  // maxReplayBodyBytes). The fetcher refuses the request before writing anything, so no
  // connection took any of the body either: the pool must send it on a new connection, as its
  // documentation promises for a request that "never reached the connection at all", and must
  // not pass on the fetcher's advice to use a ConnectionPool.
  PoolEnv env;
  closeIdleUnnoticed(env);
  auto req = env.pool->request(kj::HttpMethod::POST, "/stream", env.headers());  // chunked
  auto write = req.body->write("hello", 5).eagerlyEvaluate(nullptr);
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.droppedPeerClosedIdle == 1, "the race was not reproduced",
      stats.droppedPeerClosedIdle);
  KJ_IF_SOME(wire, env.tryAccept(300 * kj::MILLISECONDS)) {
    KJ_EXPECT(outcomeOf(env, kj::mv(write)) == nullptr);
    req.body = nullptr;
    KJ_EXPECT(wire->head().startsWith("POST /stream "));
    KJ_EXPECT(same(wire->chunkedBody(), "hello"_kj.asBytes()));
    wire->send(OK_HELLO);
    auto r = env.bounded(kj::mv(req.response));
    KJ_EXPECT(env.bounded(r.body->readAllText()) == "hello");
    KJ_EXPECT(stats.retries == 0, "sent once, counted as sent again", stats.retries);
  } else {
    KJ_IF_SOME(e, outcomeOf(env, req.response.ignoreResult())) {
      KJ_FAIL_EXPECT("a streaming upload that never reached the closed connection was not "
          "sent on a new one", e.getDescription());
      KJ_EXPECT(!contains(e.getDescription(), "a ConnectionPool does this for you"),
          "a ConnectionPool caller is told to use a ConnectionPool", e.getDescription());
    } else {
      KJ_FAIL_EXPECT("the response arrived without any connection being accepted");
    }
  }
}

}  // namespace
}  // namespace sockfetch
