// A seeded, model-based (stateful) test of StreamFetcher and ConnectionPool over long sequences of
// operations on the same objects, to find what single-exchange suites cannot: state that leaks
// from one exchange into the next on a reused connection, counters that drift, and a connection
// reused after an exchange that should have poisoned it.
//
// A small reference model, written from the headers (stream-fetcher.h, pool.h) and DESIGN.md and
// not from the implementation, predicts each step's client-visible outcome: the body the caller
// reads, the fetcher's state (IDLE or CLOSED) and CloseKind afterwards, its completed-request
// count, its observer's calls, lastExchangeWroteRequest()/lastExchangeReceivedResponse() (this
// exchange's, never the last one's) and serverSpokeFirst(), whether the pool reuses the
// connection or opens a new one and under which Stats counter it drops one (every counter is
// compared at every step, with the retirement settings maxRequestsPerConnection and neverReuse
// chosen per seed), that a refused request writes nothing, and that a dropped connection is
// closed without another byte written. A response read to its end may be kept across later
// exchanges (and release()): its headers must stay its own and its body at its end. Where the
// contract leaves a choice open (a body dropped early from a response that also said
// `Connection: close`, say) the model accepts each documented kind, and no other.
//
// Operations, from a seed: requests (GET, HEAD, POST of a known size, POST chunked, PUT, some
// with `Expect: 100-continue`, answered before or after the server reads the body), with the
// body read in full, in reads of odd minBytes/maxBytes, by pumpTo() (sometimes limited), in
// part and then dropped, with a read cancelled (the next read must then fail), the response
// promise dropped, the request body dropped short (the pool's seeds that do not buffer bodies),
// a second request() or a release() while busy;
// release() while idle and the stream wrapped in a new StreamFetcher; idle periods in which the
// server does nothing, closes, or sends bytes (then release() or a request at once); the pool's
// timer moved past idleTimeout; the fetcher or pool destroyed and made anew. The scripted server
// chooses per request: Content-Length, chunked (with trailers), close-delimited, 1xx interim
// responses, `Connection: close`, HTTP/1.0 with and without keep-alive, bytes glued after the
// response or sent once idle, a close or a reset mid-body, 204/304 with a stray body, and writes
// the response in pieces a few event-loop turns apart (sometimes holding back a chunked body's
// final CRLF). Every response carries its request's id (header and body), so a misattributed
// byte shows. Some seeds keep most exchanges clean, so that long runs of reuse happen on one
// connection (the run checks that at least one reached 10).
//
// A seed that fails reports the seed and its step list; MODEL_TEST_SEED=<n> runs that seed only
// (MODEL_TEST_VERBOSE=1 prints the step list of passing seeds too). Each transport (in-process
// pipe, loopback TCP, and loopback TCP under test::tlsLike()) runs its own seeds;
// every wait is bounded. Each distinct failure the seeds found is a fixed case below.

#include "pool.h"
#include "stream-fetcher.h"

#include <sockfetch/connector.h>
#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/timer.h>
#include <kj/vector.h>
#include <algorithm>
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

namespace sockfetch {
namespace test {
namespace {

using CloseKind = StreamFetcher::CloseKind;
using State = StreamFetcher::State;

constexpr unsigned STEPS = 300;
constexpr unsigned FETCHER_SEEDS = 24;  // per transport
constexpr unsigned POOL_SEEDS = 16;     // per transport (and for the TLS-like fetcher)

// =================================================================================================
// The scripted server's end of one connection, driven step by step by the test.

class Srv {
public:
  Srv(LoopEnv& env, kj::Own<kj::AsyncIoStream> stream): env(env), stream(kj::mv(stream)) {}

  void send(kj::String bytes) {
    // Queues `bytes` behind what is already being written (a pipe completes a write once read).
    ++pending;
    tail = tail.then([this, bytes = kj::mv(bytes)]() mutable -> kj::Promise<void> {
      if (stream.get() == nullptr) return kj::READY_NOW;
      return writeAll(*stream, bytes.asBytes()).attach(kj::mv(bytes));
    }).then([this]() { --pending; }, [this](kj::Exception&&) {
      --pending;
      broken = true;
    }).eagerlyEvaluate(nullptr);
  }

  void shutdown() {
    // Ends the server's side (FIN, or a pipe's end) after what is queued.
    ++pending;
    tail = tail.then([this]() {
      --pending;
      if (stream.get() != nullptr) stream->shutdownWrite();
    }, [this](kj::Exception&&) { --pending; }).eagerlyEvaluate(nullptr);
  }

  void pause(unsigned turns) {
    // The next bytes queued go out only after `turns` more turns of the event loop.
    for (unsigned i = 0; i < turns; i++) {
      tail = tail.then([]() { return kj::evalLater([]() {}); }).eagerlyEvaluate(nullptr);
    }
  }

  void delay(kj::Duration d) {
    // The next bytes queued go out only after `d` (real time: on a socket they then arrive apart).
    tail = tail.then([this, d]() { return env.timer.afterDelay(d); }).eagerlyEvaluate(nullptr);
  }

  void reset() {
    // Ends the connection abruptly after what is queued: RST on a socket, the end destroyed on a
    // pipe.
    ++pending;
    tail = tail.then([this]() {
      --pending;
      KJ_IF_SOME(fd, stream->getFd()) {
        struct linger lin = {1, 0};
        KJ_SYSCALL(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lin, sizeof(lin)));
      }
      stream = nullptr;
    }, [this](kj::Exception&&) { --pending; }).eagerlyEvaluate(nullptr);
  }

  void flush() {
    env.waitFor([this]() { return pending == 0; });
    KJ_ASSERT(pending == 0, "the server's write was never taken by the client");
  }

  kj::String readHead() {
    for (;;) {
      auto text = kj::arrayPtr(buffer.begin(), buffer.size());
      for (size_t i = 0; i + 4 <= text.size(); i++) {
        if (memcmp(text.begin() + i, "\r\n\r\n", 4) == 0) return take(i + 4);
      }
      KJ_ASSERT(fill(), "the client closed the connection before a full request head",
          kj::heapString(buffer.begin(), buffer.size()));
    }
  }

  kj::String readExactly(size_t n) {
    while (buffer.size() < n) {
      KJ_ASSERT(fill(), "the client closed the connection early", n, buffer.size());
    }
    return take(n);
  }

  kj::String readRequest(kj::Maybe<kj::StringPtr> afterHead = nullptr) {
    // A request head and its body (de-chunked); `afterHead` is sent once the head is read.
    auto head = readHead();
    KJ_IF_SOME(bytes, afterHead) send(kj::str(bytes));
    KJ_IF_SOME(length, field(head, "content-length")) {
      return kj::str(head, readExactly(length.parseAs<size_t>()));
    }
    KJ_IF_SOME(te, field(head, "transfer-encoding")) {
      KJ_ASSERT(te == "chunked", te);
      kj::Vector<char> body;
      for (;;) {
        kj::String line;
        for (;;) {
          auto* nl = buffer.size() == 0 ? nullptr
              : reinterpret_cast<const char*>(memchr(buffer.begin(), '\n', buffer.size()));
          if (nl != nullptr) {
            line = take(nl - buffer.begin() + 1);
            break;
          }
          KJ_ASSERT(fill(), "the client closed the connection inside a chunked body");
        }
        size_t size = strtoul(line.cStr(), nullptr, 16);
        if (size == 0) {
          KJ_ASSERT(readExactly(2) == "\r\n", "chunked request body without its final CRLF");
          break;
        }
        body.addAll(readExactly(size));
        KJ_ASSERT(readExactly(2) == "\r\n");
      }
      return kj::str(head, kj::arrayPtr(body.begin(), body.size()));
    }
    return head;
  }

  void expectEnd(kj::StringPtr why) {
    // The client closes this connection (within the limit) without writing anything more.
    if (stream.get() == nullptr) {
      ended = true;  // reset by the server: nothing to read
      return;
    }
    while (fill()) {}
    KJ_ASSERT(buffer.size() == 0, "the client wrote on a connection it should have closed", why,
        kj::heapString(buffer.begin(), buffer.size()));
    ended = true;
  }

  bool ended = false;  // expectEnd() saw the client's end
  bool broken = false;  // a write failed (the client had gone)

private:
  LoopEnv& env;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Vector<char> buffer;
  unsigned pending = 0;
  kj::Promise<void> tail = kj::READY_NOW;

  bool fill() {
    if (stream.get() == nullptr) return false;
    char chunk[4096];
    size_t n = 0;
    KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
      n = env.bounded(stream->tryRead(chunk, 1, sizeof(chunk)));
    })) {
      if (e.getType() == kj::Exception::Type::DISCONNECTED) return false;  // reset
      kj::throwFatalException(kj::mv(e));
    }
    buffer.addAll(chunk, chunk + n);
    return n > 0;
  }

  kj::String take(size_t n) {
    auto result = kj::heapString(buffer.begin(), n);
    kj::Vector<char> rest;
    rest.addAll(buffer.begin() + n, buffer.end());
    buffer = kj::mv(rest);
    return result;
  }

  static kj::Maybe<kj::String> field(kj::StringPtr head, kj::StringPtr name) {
    auto lower = kj::heapString(head);
    for (auto& c: lower) c = tolower(c);
    auto needle = kj::str("\r\n", name, ":");
    const char* found = strstr(lower.cStr(), needle.cStr());
    if (found == nullptr) return nullptr;
    size_t start = found - lower.cStr() + needle.size();
    size_t end = start;
    while (end < head.size() && head[end] != '\r') end++;
    while (start < end && head[start] == ' ') start++;
    return kj::heapString(head.slice(start).begin(), end - start);
  }
};

// =================================================================================================
// One exchange: what the caller asks for, what the server answers, what the caller does.

enum class Method { GET, HEAD, POST, POST_CHUNKED, PUT };
enum class Framing { LENGTH, CHUNKED, CLOSE };
enum class Stray { NONE, GLUED, LATER, BODILESS_BODY };
enum class Action {
  FULL,            // read the body to its end with readAllText(), then drop it
  FULL_KEEP_BODY,  // the same, but look at the client's state before dropping the body
  ODD_READS,       // tryRead() with random minBytes <= maxBytes until the end
  PARTIAL_DROP,    // read part of the body, drop it
  CANCEL_READ,     // read part, cancel a read that waits for more, read again (must fail)
  DROP_PROMISE,    // drop the response promise before the response is complete
  DROP_REQ_BODY,   // write half the request body, drop it
  CONCURRENT,      // (fetcher) a second request() while busy, then FULL
  RELEASE_BUSY,    // (fetcher) release() while busy, then FULL
  PUMP,            // pumpTo() a sink (sometimes with a limit, then the rest), then drop it
};

kj::StringPtr name(Method m) {
  static const kj::StringPtr names[] = {"GET", "HEAD", "POST", "POST-chunked", "PUT"};
  return names[unsigned(m)];
}
kj::StringPtr name(Framing f) {
  static const kj::StringPtr names[] = {"length", "chunked", "close-delimited"};
  return names[unsigned(f)];
}
kj::StringPtr name(Stray s) {
  static const kj::StringPtr names[] = {"-", "glued", "later", "bodiless-body"};
  return names[unsigned(s)];
}
kj::StringPtr name(Action a) {
  static const kj::StringPtr names[] = {"full", "full-keep-body", "odd-reads", "partial-drop",
      "cancel-read", "drop-promise", "drop-request-body", "concurrent", "release-busy", "pump"};
  return names[unsigned(a)];
}

struct Exchange {
  unsigned id;
  Method method = Method::GET;
  bool expect100 = false;
  kj::String requestBody;
  unsigned status = 200;
  Framing framing = Framing::LENGTH;
  bool http10 = false;
  bool keepAlive10 = false;
  bool connectionClose = false;
  bool trailers = false;
  bool cut = false;  // the server ends the connection in the middle of the body
  bool reset = false;  // ... abruptly (RST), else with a FIN (a pipe's end)
  kj::Vector<size_t> cuts;  // the response is written in pieces, cut at these offsets
  unsigned pauseTurns = 0;  // event-loop turns between pieces
  bool pauseTime = false;   // ... and a millisecond too
  bool continueEarly = false;  // expect100: 100 Continue comes before the server reads the body
  bool keepBody = false;  // FULL_KEEP_BODY: the body (at its end) is kept into later exchanges
  unsigned interim = 0;
  Stray stray = Stray::NONE;
  kj::String body;  // what the caller must read
  Action action = Action::FULL;
  size_t part = 0;  // PARTIAL_DROP, CANCEL_READ: bytes read first
  bool dropAfterPart = false;  // DROP_PROMISE: part of the response came first
  kj::Vector<size_t> chunks;   // chunked framing: chunk sizes
  uint64_t oddSeed = 0;        // ODD_READS

  bool bodiless() const {
    return method == Method::HEAD || status == 204 || status == 304;
  }
  bool hasRequestBody() const {
    return method == Method::POST || method == Method::POST_CHUNKED || method == Method::PUT;
  }
  bool serverCloses() const {
    // The server ends the connection after its response.
    return cut || connectionClose || framing == Framing::CLOSE || (http10 && !keepAlive10);
  }

  kj::String describe() const {
    return kj::str("id=", id, " ", name(method), expect100 ? "+expect100" : "",
        hasRequestBody() ? kj::str(" reqBody=", requestBody.size()) : kj::str(""), " -> ",
        http10 ? (keepAlive10 ? "1.0+keep-alive " : "1.0 ") : "", status, " ", name(framing),
        trailers ? "+trailers" : "", " body=", body.size(), interim ? kj::str(" interim=", interim)
        : kj::str(""), connectionClose ? " Connection:close" : "",
        cut ? (reset ? " reset-mid-body" : " cut") : "", cuts.size() ? kj::str(" pieces@",
        kj::strArray(cuts, ","), "/", pauseTurns, pauseTime ? "+1ms" : "") : kj::str(""),
        continueEarly ? " 100-first" : "", keepBody ? " keep" : "",
        stray != Stray::NONE ? kj::str(" stray=", name(stray)) : kj::str(""), " | ",
        name(action), part ? kj::str("(", part, ")") : kj::str(""),
        dropAfterPart ? "(after part)" : "");
  }

  kj::String head() const {
    kj::Vector<kj::String> parts;
    for (unsigned i = 0; i < interim; i++) {
      parts.add(kj::str(i % 2 == 0 ? "HTTP/1.1 100 Continue\r\n\r\n"
          : "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"));
    }
    kj::StringPtr reason = status == 200 ? "OK" : status == 204 ? "No Content" : "Not Modified";
    parts.add(kj::str(http10 ? "HTTP/1.0 " : "HTTP/1.1 ", status, " ", reason, "\r\n"));
    parts.add(kj::str("X-Id: ", id, "\r\n"));
    if (connectionClose) parts.add(kj::str("Connection: close\r\n"));
    if (http10 && keepAlive10) parts.add(kj::str("Connection: keep-alive\r\n"));
    if (status == 200) {
      if (framing == Framing::LENGTH) {
        size_t length = method == Method::HEAD ? 17 + id % 50 : body.size();
        parts.add(kj::str("Content-Length: ", length, "\r\n"));
      } else if (framing == Framing::CHUNKED) {
        parts.add(kj::str("Transfer-Encoding: chunked\r\n"));
      }
    }
    parts.add(kj::str("\r\n"));
    return kj::strArray(parts, "");
  }

  kj::String bodyWire() const {
    if (bodiless()) return kj::str("");
    if (framing != Framing::CHUNKED) return kj::str(body);
    kj::Vector<kj::String> parts;
    size_t at = 0;
    for (auto size: chunks) {
      parts.add(kj::str(kj::hex(size), "\r\n", body.slice(at).slice(0, size), "\r\n"));
      at += size;
    }
    KJ_ASSERT(at == body.size());
    parts.add(kj::str("0\r\n", trailers ? kj::str("X-Trailer: t", id, "\r\n") : kj::str(""),
        "\r\n"));
    return kj::strArray(parts, "");
  }

  kj::String strayBytes() const {
    switch (stray) {
      case Stray::GLUED:
      case Stray::LATER:
        return kj::str("HTTP/1.1 200 OK\r\nX-Id: 999", id, "\r\nContent-Length: 5\r\n\r\nWRONG");
      case Stray::BODILESS_BODY: return kj::str("STRAY-BODY-", id);
      case Stray::NONE: break;
    }
    return kj::str("");
  }
};

kj::String makeBody(Rng& rng, unsigned id) {
  unsigned r = rng.below(100);
  size_t length = r < 70 ? rng.below(200)
      : r < 95 ? 1000 + rng.below(4000) : 20000 + rng.below(50000);
  kj::Vector<char> text;
  text.addAll(kj::str("<body of ", id, ">"));
  while (text.size() < length) text.add('a' + (text.size() * 7 + id) % 26);
  return kj::heapString(text.begin(), text.size());
}

Exchange generate(Rng& rng, unsigned id, bool forPool, unsigned cleanPercent,
    bool bodiesStreamed = true) {
  // cleanPercent: how many exchanges leave the connection reusable (so that long runs of reuse
  // happen on one connection).
  Exchange e;
  bool clean = rng.chance(cleanPercent);
  e.id = id;
  static const Method methods[] = {Method::GET, Method::GET, Method::GET, Method::HEAD,
      Method::POST, Method::POST_CHUNKED, Method::PUT};
  e.method = rng.pick(methods);
  if (e.hasRequestBody()) {
    size_t length = 1 + (rng.chance(10) ? 2000 + rng.below(3000) : rng.below(300));
    kj::Vector<char> text;
    text.addAll(kj::str("<request ", id, ">"));
    while (text.size() < length) text.add('A' + (text.size() + id) % 26);
    e.requestBody = kj::heapString(text.begin(), text.size());
    e.expect100 = rng.chance(30);
  }
  if (e.method == Method::GET && rng.chance(10)) e.status = rng.chance(50) ? 204 : 304;
  if (!e.bodiless()) e.body = makeBody(rng, id);
  if (!e.bodiless()) {
    unsigned r = rng.below(100);
    e.framing = r < 55 ? Framing::LENGTH : r < 90 ? Framing::CHUNKED : Framing::CLOSE;
  }
  if (e.framing == Framing::CHUNKED) {
    size_t left = e.body.size();
    while (left > 0) {
      size_t size = kj::min(left, size_t(1 + rng.below(rng.chance(50) ? 16 : 3000)));
      e.chunks.add(size);
      left -= size;
    }
    e.trailers = rng.chance(50);
  }
  if (e.framing == Framing::LENGTH && !e.bodiless() && rng.chance(10)) {
    e.http10 = true;
    e.keepAlive10 = rng.chance(50);
  }
  e.connectionClose = e.framing != Framing::CLOSE && !e.http10 && rng.chance(8);
  e.interim = e.expect100 ? 1 + rng.below(2) : rng.chance(15) ? 1 + rng.below(2) : 0;
  e.cut = !e.bodiless() && e.framing != Framing::CLOSE && !e.connectionClose && !e.http10 &&
      e.body.size() >= 4 && rng.chance(6);
  e.reset = e.cut && rng.chance(50);
  if (!e.serverCloses() && rng.chance(12)) {
    if (e.bodiless() && rng.chance(40)) {
      e.stray = Stray::BODILESS_BODY;
    } else {
      e.stray = rng.chance(50) ? Stray::GLUED : Stray::LATER;
    }
  }

  if (clean) {
    if (e.framing == Framing::CLOSE) e.framing = Framing::LENGTH;
    if (e.http10) e.keepAlive10 = true;
    e.connectionClose = false;
    e.cut = false;
    e.reset = false;
    e.stray = Stray::NONE;
  }

  // What the caller does.
  kj::Vector<Action> possible;
  for (unsigned i = 0; i < 6; i++) possible.add(Action::FULL);
  possible.add(Action::FULL_KEEP_BODY);
  possible.add(Action::FULL_KEEP_BODY);
  possible.add(Action::ODD_READS);
  possible.add(Action::ODD_READS);
  possible.add(Action::PUMP);
  possible.add(Action::DROP_PROMISE);
  if (!e.bodiless() && !e.cut && e.body.size() >= 4) {
    possible.add(Action::PARTIAL_DROP);
    possible.add(Action::PARTIAL_DROP);
    if (e.framing == Framing::LENGTH && e.stray == Stray::NONE && !e.serverCloses()) {
      possible.add(Action::CANCEL_READ);
      possible.add(Action::CANCEL_READ);
    }
  }
  if ((e.method == Method::POST || e.method == Method::PUT) && e.requestBody.size() >= 2 &&
      bodiesStreamed) {
    // (A pool that buffers a body of known size sends nothing of a body dropped short: whether
    // it then takes a connection at all is not specified, so the model only drops streamed
    // bodies.)
    possible.add(Action::DROP_REQ_BODY);
  }
  if (!forPool) {
    possible.add(Action::CONCURRENT);
    possible.add(Action::RELEASE_BUSY);
  }
  e.action = possible[rng.below(possible.size())];
  if (clean && e.action != Action::FULL_KEEP_BODY && e.action != Action::ODD_READS &&
      e.action != Action::PUMP &&
      e.action != Action::CONCURRENT && e.action != Action::RELEASE_BUSY) {
    e.action = Action::FULL;
  }
  if (e.action == Action::PARTIAL_DROP || e.action == Action::CANCEL_READ) {
    e.part = 1 + rng.below(e.body.size() - 1);
  }
  if (e.action == Action::DROP_PROMISE) e.dropAfterPart = rng.chance(50);
  e.keepBody = e.action == Action::FULL_KEEP_BODY && rng.chance(40);
  if (!e.cut && e.action != Action::CANCEL_READ && e.action != Action::DROP_PROMISE &&
      e.action != Action::DROP_REQ_BODY && rng.chance(40)) {
    size_t total = e.head().size() + e.bodyWire().size() +
        (e.stray == Stray::GLUED || e.stray == Stray::BODILESS_BODY ? e.strayBytes().size() : 0);
    unsigned n = 1 + rng.below(3);
    for (unsigned i = 0; i < n; i++) e.cuts.add(1 + rng.below(total - 1));
    if (e.framing == Framing::CHUNKED && !e.bodiless() && rng.chance(50)) {
      // The chunked body's final CRLF comes late.
      e.cuts.add(e.head().size() + e.bodyWire().size() - 2);
    }
    std::sort(e.cuts.begin(), e.cuts.end());
    e.pauseTurns = rng.below(4);
    e.pauseTime = rng.chance(8);
  }
  e.continueEarly = e.expect100 && rng.chance(50);
  e.oddSeed = rng.next();
  return e;
}

// -------------------------------------------------------------------------------------------------
// The model's verdict on an exchange, from the headers' words.

struct Verdict {
  bool reusable = false;
  kj::Vector<CloseKind> kinds;  // acceptable CloseKinds if not reusable
  bool readFails = false;       // the body read (to its end) fails
  bool responseFails = false;   // the response promise fails

  bool accepts(CloseKind kind) const {
    for (auto k: kinds) if (k == kind) return true;
    return false;
  }
  kj::String describe() const {
    if (reusable) return kj::str("reusable");
    return kj::str("closed as one of {", kj::strArray(KJ_MAP(k, kinds) { return kj::str(k); },
        ", "), "}");
  }
};

kj::Maybe<CloseKind> terminalKind(const Exchange& e) {
  // How the server's answer alone ends reuse, read to its end:
  //  - a body cut short fails ("Bodies framed by Content-Length or chunked encoding fail when
  //    cut"): FAILED;
  //  - `Connection: close`: CONNECTION_CLOSE;
  //  - HTTP/1.0 without keep-alive, a body delimited by the close: NOT_REUSABLE;
  //  - anything past the end of the response (a glued response, a 204/304/HEAD's stray body,
  //    bytes once idle): UNSOLICITED_BYTES.
  if (e.cut) return CloseKind::FAILED;
  if (e.connectionClose) return CloseKind::CONNECTION_CLOSE;
  if (e.framing == Framing::CLOSE && !e.bodiless()) return CloseKind::NOT_REUSABLE;
  if (e.http10 && !e.keepAlive10) return CloseKind::NOT_REUSABLE;
  if (e.stray != Stray::NONE) return CloseKind::UNSOLICITED_BYTES;
  return nullptr;
}

Verdict verdictOf(const Exchange& e) {
  Verdict v;
  switch (e.action) {
    case Action::DROP_PROMISE:
      // "the guard is RAII: if it is destroyed before the exchange completed (the caller
      // cancelled the promise ...) the stream is dropped": ABANDONED ("a request or read
      // cancelled").
      v.kinds.add(CloseKind::ABANDONED);
      return v;
    case Action::DROP_REQ_BODY:
      // "A body dropped before the request was sent in full ... fails a response still awaited
      // at once, and the connection is closed": ABANDONED ("a body dropped early").
      v.kinds.add(CloseKind::ABANDONED);
      v.responseFails = true;
      return v;
    case Action::PARTIAL_DROP:
    case Action::CANCEL_READ:
      // A body dropped (or a read cancelled) before its end: ABANDONED; a head that already
      // ruled out reuse, or bytes already past the end, may be the reason given instead.
      v.kinds.add(CloseKind::ABANDONED);
      KJ_IF_SOME(k, terminalKind(e)) {
        if (!(k == CloseKind::UNSOLICITED_BYTES && e.stray == Stray::LATER)) v.kinds.add(k);
      }
      v.readFails = e.action == Action::CANCEL_READ;
      return v;
    default:
      KJ_IF_SOME(k, terminalKind(e)) {
        v.kinds.add(k);
        v.readFails = e.cut;
      } else {
        v.reusable = true;
      }
      return v;
  }
}

// =================================================================================================
// Running one exchange against a kj::HttpClient (a StreamFetcher or a ConnectionPool).

kj::Maybe<kj::String> fieldOf(const kj::HttpHeaders& headers, kj::StringPtr wanted) {
  kj::Maybe<kj::String> result;
  headers.forEach([&](kj::StringPtr n, kj::StringPtr v) {
    if (n.size() != wanted.size()) return;
    for (size_t i = 0; i < n.size(); i++) {
      if (tolower(n[i]) != tolower(wanted[i])) return;
    }
    result = kj::str(v);
  });
  return result;
}

template <typename T>
kj::String orNone(const kj::Maybe<T>& maybe) {
  KJ_IF_SOME(value, maybe) return kj::str(value);
  return kj::str("(none)");
}

template <typename F>
kj::Exception thrownBy(F&& f, kj::StringPtr what) {
  KJ_IF_SOME(e, kj::runCatchingExceptions(kj::fwd<F>(f))) {
    return kj::mv(e);
  }
  KJ_FAIL_ASSERT("expected a throw", what);
}

void turns(kj::WaitScope& ws, unsigned n = 8) {
  for (unsigned i = 0; i < n; i++) kj::evalLater([]() {}).wait(ws);
}

kj::Promise<void> writePieces(kj::AsyncOutputStream& out, kj::ArrayPtr<const kj::byte> bytes,
    size_t piece) {
  if (bytes.size() == 0) return kj::READY_NOW;
  size_t n = kj::min(piece, bytes.size());
  return writeAll(out, bytes.slice(0, n)).then([&out, bytes, piece, n]() {
    return writePieces(out, bytes.slice(n, bytes.size()), piece);
  });
}

class Sink final: public kj::AsyncOutputStream {
  // Collects what is pumped into it.
public:
  kj::Vector<char> data;
  kj::Promise<void> write(const void* buffer, size_t size) override {
    data.addAll(reinterpret_cast<const char*>(buffer),
        reinterpret_cast<const char*>(buffer) + size);
    return kj::READY_NOW;
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    for (auto piece: pieces) write(piece.begin(), piece.size());
    return kj::READY_NOW;
  }
  kj::Promise<void> whenWriteDisconnected() override { return kj::NEVER_DONE; }
};

struct Stale {
  // A response whose body was read to its end, kept across later exchanges.
  kj::Maybe<kj::HttpClient::Response> response;
  unsigned id = 0;
};

void checkStale(LoopEnv& env, Stale& stale) {
  // "A response's headers and statusText stay valid until its body is dropped", and a body at
  // its end stays there: reading it again gives nothing, never a byte of a later exchange.
  KJ_IF_SOME(r, stale.response) {
    auto id = fieldOf(*r.headers, "x-id");
    KJ_ASSERT(orNone(id) == kj::str(stale.id), "a kept response's headers changed", orNone(id));
    char buffer[64];
    size_t n = env.bounded(kj::evalNow([&]() { return r.body->tryRead(buffer, 1, 64); }));
    KJ_ASSERT(n == 0, "a body at its end gave bytes after a later exchange",
        kj::heapString(buffer, n));
  }
}

struct Hooks {
  // What differs between a StreamFetcher and a ConnectionPool.
  kj::Function<Srv&()> server;  // the server end the request went to (called after request())
  kj::Maybe<StreamFetcher&> fetcher;
  kj::Maybe<ConnectionPool&> pool;
  bool poolKeeps = true;  // the pool keeps a clean connection idle (no retirement setting hit)
  Stale& stale;
};

struct Coverage {
  // What the seeds exercised, so that a run that silently skipped a path fails.
  unsigned actions[10] = {};
  unsigned reused = 0;
  unsigned kinds[9] = {};
  unsigned idleOps = 0;
  unsigned releases = 0;
  unsigned releasedWithBytes = 0;
  uint64_t longestRun = 0;  // most clean exchanges in a row on one connection
};
Coverage coverage;

struct Observed {
  bool refused = false;
  bool responseFailed = false;
  bool readFailed = false;
  bool sentLater = false;  // the server sent stray bytes once the client had read the response
};

Observed runExchange(LoopEnv& env, kj::HttpClient& client, const Exchange& e, Hooks& hooks,
    const Verdict& verdict) {
  Observed o;
  auto h = env.headers();
  if (e.expect100) h.add("Expect", "100-continue");
  auto url = kj::str("/r", e.id);
  kj::HttpMethod method = kj::HttpMethod::GET;
  kj::Maybe<uint64_t> size;
  switch (e.method) {
    case Method::GET: break;
    case Method::HEAD: method = kj::HttpMethod::HEAD; break;
    case Method::POST: method = kj::HttpMethod::POST; size = e.requestBody.size(); break;
    case Method::POST_CHUNKED: method = kj::HttpMethod::POST; break;
    case Method::PUT: method = kj::HttpMethod::PUT; size = e.requestBody.size(); break;
  }
  ++coverage.actions[unsigned(e.action)];
  auto req = client.request(method, url, h, size);

  kj::Maybe<kj::Promise<void>> writing;
  size_t half = e.requestBody.size() / 2;
  if (!e.hasRequestBody()) {
    req.body = nullptr;
  } else if (e.action == Action::DROP_REQ_BODY) {
    writing = writeAll(*req.body, e.requestBody.asBytes().slice(0, half)).eagerlyEvaluate(nullptr);
  } else {
    size_t piece = e.method == Method::POST_CHUNKED ? 1 + e.id % 200 : e.requestBody.size();
    auto& body = *req.body;
    writing = writePieces(body, e.requestBody.asBytes(), piece).attach(kj::mv(req.body))
        .eagerlyEvaluate(nullptr);
  }

  Srv& srv = hooks.server();  // (a pool may connect only once the body is buffered)

  KJ_IF_SOME(fetcher, hooks.fetcher) {
    if (e.action == Action::CONCURRENT) {
      auto h2 = env.headers();
      auto ex = thrownBy([&]() { fetcher.request(kj::HttpMethod::GET, "/concurrent", h2); },
          "request() while busy");
      KJ_ASSERT(contains(ex.getDescription(), "one request at a time"), ex);
      KJ_ASSERT(fetcher.getState() == State::BUSY, fetcher.getState());
    }
    if (e.action == Action::RELEASE_BUSY) {
      auto ex = thrownBy([&]() { fetcher.release(); }, "release() while busy");
      KJ_ASSERT(ex.getType() == kj::Exception::Type::FAILED, ex);
      KJ_ASSERT(fetcher.getState() == State::BUSY, fetcher.getState());
    }
  }

  auto expectedLine = kj::str(e.method == Method::HEAD ? "HEAD" : e.method == Method::GET ? "GET"
      : e.method == Method::PUT ? "PUT" : "POST", " ", url, " HTTP/1.1\r\n");
  if (e.action == Action::DROP_REQ_BODY) {
    auto head = srv.readHead();
    KJ_ASSERT(head.startsWith(expectedLine), "the server got another request", head);
    KJ_ASSERT(srv.readExactly(half) == e.requestBody.slice(0, half));
    KJ_IF_SOME(w, writing) env.bounded(kj::mv(w));
    writing = nullptr;
    req.body = nullptr;
    auto failed = env.failureOf(kj::mv(req.response));
    o.responseFailed = true;
    return o;
  }

  kj::Maybe<kj::StringPtr> early;
  if (e.continueEarly) early = "HTTP/1.1 100 Continue\r\n\r\n"_kj;
  auto text = srv.readRequest(early);
  KJ_ASSERT(text.startsWith(expectedLine), "the server got another request", text, expectedLine);
  {
    auto at = strstr(text.cStr(), "\r\n\r\n");
    KJ_ASSERT(at != nullptr);
    auto got = text.slice(at - text.cStr() + 4);
    KJ_ASSERT(got == e.requestBody, "the request body arrived altered", got.size(),
        e.requestBody.size());
  }
  KJ_IF_SOME(w, writing) env.bounded(kj::mv(w));
  writing = nullptr;

  auto head = e.head();
  auto wire = e.bodyWire();
  if (e.action == Action::DROP_PROMISE) {
    if (e.dropAfterPart) srv.send(kj::str(head.slice(0, head.size() / 2)));
    turns(env.ws, 3);
    { auto dropped = kj::mv(req.response); }
    o.responseFailed = true;
    return o;
  }

  if (e.action == Action::CANCEL_READ) {
    srv.send(kj::str(head, wire.slice(0, e.part)));
  } else if (e.cut) {
    srv.send(kj::str(head, wire.slice(0, wire.size() / 2)));
    if (!e.reset) srv.shutdown();
  } else {
    auto glued = e.stray == Stray::GLUED || e.stray == Stray::BODILESS_BODY ? e.strayBytes()
        : kj::str("");
    auto all = kj::str(head, wire, glued);
    size_t at = 0;
    for (auto cut: e.cuts) {
      if (cut <= at || cut >= all.size()) continue;
      srv.send(kj::heapString(all.slice(at).begin(), cut - at));
      srv.pause(e.pauseTurns);
      if (e.pauseTime) srv.delay(1 * kj::MILLISECONDS);
      at = cut;
    }
    srv.send(kj::str(all.slice(at)));
    if (e.serverCloses()) srv.shutdown();
  }

  if (e.reset) {
    // The head may be lost with the reset (a socket's unread input goes with it): either the
    // response or the body's read fails.
    auto outcome = env.bounded(req.response.then(
        [&](kj::HttpClient::Response&& response) -> kj::Promise<bool> {
      auto& body = *response.body;
      srv.reset();
      return body.readAllText().attach(kj::mv(response.body)).then(
          [](kj::String) { return false; }, [](kj::Exception&&) { return true; });
    }, [](kj::Exception&&) -> kj::Promise<bool> { return true; }));
    KJ_ASSERT(outcome, "a body cut by a reset was read without an error");
    o.readFailed = true;
    return o;
  }

  auto response = env.bounded(kj::mv(req.response));
  KJ_ASSERT(response.statusCode == e.status, "wrong status", response.statusCode);
  auto id = fieldOf(*response.headers, "x-id");
  KJ_ASSERT(orNone(id) == kj::str(e.id), "a response reached the wrong request", orNone(id));
  checkStale(env, hooks.stale);

  auto& body = *response.body;
  // A length the body reports is the length of what is left: all of it, before any read.
  KJ_IF_SOME(length, body.tryGetLength()) {
    if (!e.cut) {
      KJ_ASSERT(length == e.body.size(), "tryGetLength() is not this body's", length,
          e.body.size());
    }
  }
  switch (e.action) {
    case Action::FULL:
    case Action::FULL_KEEP_BODY:
    case Action::CONCURRENT:
    case Action::RELEASE_BUSY: {
      if (verdict.readFails) {
        env.failureOf(body.readAllText());
        o.readFailed = true;
      } else {
        auto got = env.bounded(body.readAllText());
        KJ_ASSERT(got == e.body, "the body read is not this response's", got.size(),
            e.body.size(), got.slice(0, kj::min(got.size(), size_t(40))));
      }
      if (e.keepBody && verdict.reusable) {
        // Kept into later exchanges: it must stay at its end (see checkStale()).
        turns(env.ws);
        hooks.stale.response = kj::mv(response);
        hooks.stale.id = e.id;
        return o;
      }
      if (e.action == Action::FULL_KEEP_BODY && verdict.reusable) {
        turns(env.ws);
        KJ_IF_SOME(fetcher, hooks.fetcher) {
          // "The connection comes back (the fetcher is IDLE again) when the response body has
          // been read to its end" -- the body object itself is still held.
          KJ_ASSERT(fetcher.getState() == State::IDLE,
              "body read to its end, but not IDLE while held", fetcher.getState());
        }
        KJ_IF_SOME(pool, hooks.pool) {
          // "The connection comes back to the pool when its StreamFetcher gives it back
          // (response body read to its end, connection clean)"
          if (hooks.poolKeeps) {
            KJ_ASSERT(pool.getIdleCount() == 1, "body read to its end, but not idle while held",
                pool.getIdleCount(), pool.getOpenCount());
          }
        }
      }
      break;
    }
    case Action::PUMP: {
      Sink sink;
      Rng odd(e.oddSeed);
      bool failed = false;
      KJ_IF_SOME(ex, kj::runCatchingExceptions([&]() {
        if (odd.chance(50) && e.body.size() > 0) {
          uint64_t limit = odd.below(e.body.size());
          auto n = env.bounded(body.pumpTo(sink, limit));
          KJ_ASSERT(n == limit, n, limit);
        }
        env.bounded(body.pumpTo(sink));
      })) {
        KJ_ASSERT(verdict.readFails, "a pump failed", ex);
        failed = true;
      }
      KJ_ASSERT(failed == verdict.readFails, "a cut body pumped without an error");
      o.readFailed = failed;
      if (!failed) {
        auto got = kj::heapString(sink.data.begin(), sink.data.size());
        KJ_ASSERT(got == e.body, "the pump gave another body", got.size(), e.body.size());
      }
      break;
    }
    case Action::ODD_READS: {
      Rng odd(e.oddSeed);
      kj::Vector<char> got;
      char buffer[64];
      bool failed = false;
      for (unsigned i = 0; i < 200000; i++) {
        size_t max = 1 + odd.below(odd.chance(50) ? 7 : 64);
        size_t min = odd.chance(10) ? 0 : 1 + odd.below(max);
        size_t n = 0;
        KJ_IF_SOME(ex, kj::runCatchingExceptions([&]() {
          n = env.bounded(body.tryRead(buffer, min, max));
        })) {
          KJ_ASSERT(verdict.readFails, "a read failed", ex);
          failed = true;
          break;
        }
        KJ_ASSERT(n <= max);
        got.addAll(buffer, buffer + n);
        if (n < min) break;
      }
      KJ_ASSERT(failed == verdict.readFails, "a cut body read without an error");
      o.readFailed = failed;
      if (!failed) {
        KJ_ASSERT(kj::heapString(got.begin(), got.size()) == e.body,
            "odd reads gave another body", got.size(), e.body.size());
      }
      break;
    }
    case Action::PARTIAL_DROP:
    case Action::CANCEL_READ: {
      auto buffer = kj::heapArray<char>(e.part);
      size_t got = 0;
      while (got < e.part) {
        size_t n = env.bounded(body.tryRead(buffer.begin() + got, 1, e.part - got));
        KJ_ASSERT(n > 0, "the body ended early", got, e.part);
        got += n;
      }
      KJ_ASSERT(kj::heapString(buffer.begin(), got) == e.body.slice(0, e.part));
      if (e.action == Action::CANCEL_READ) {
        char more[16];
        {
          auto pending = body.tryRead(more, 1, sizeof(more));
          KJ_ASSERT(!pending.poll(env.ws), "a read completed with no bytes sent");
        }
        srv.send(kj::str(wire.slice(e.part)));
        turns(env.ws, 3);
        // "a cancelled body read makes the next read fail"
        env.failureOf(kj::evalNow([&]() { return body.tryRead(more, 1, sizeof(more)); }));
        o.readFailed = true;
      }
      break;
    }
    default:
      KJ_UNREACHABLE;
  }
  response.body = nullptr;
  if (e.stray == Stray::LATER && (e.action == Action::FULL || e.action == Action::FULL_KEEP_BODY
      || e.action == Action::ODD_READS || e.action == Action::CONCURRENT ||
      e.action == Action::RELEASE_BUSY || e.action == Action::PUMP)) {
    // Once the client is idle again, the server sends bytes nobody asked for.
    turns(env.ws, 3);
    srv.send(e.strayBytes());
    o.sentLater = true;
  }
  return o;
}

kj::String joined(const kj::Vector<kj::String>& log) {
  return kj::strArray(log, "\n");
}

kj::Maybe<uint64_t> onlySeed() {
  const char* s = getenv("MODEL_TEST_SEED");
  if (s == nullptr) return nullptr;
  return strtoull(s, nullptr, 10);
}

// =================================================================================================
// StreamFetcher: the model and the world.

struct FetcherWorld: public LoopEnv {
  bool tcp;
  bool tls = false;  // the client's stream is test::tlsLike() over the TCP connection
  kj::Own<Srv> srv;
  kj::Own<StreamFetcher> fetcher;
  Stale stale;

  // The model.
  bool open = false;            // IDLE (else CLOSED)
  kj::Vector<CloseKind> kinds;  // acceptable kinds while closed
  uint64_t completed = 0;       // clean exchanges on this StreamFetcher
  bool requestWritten = false;  // a request reached this connection (across release())
  unsigned cleanPercent = 50;
  uint64_t run = 0;  // clean exchanges on this connection (across release())

  struct Counting final: public StreamFetcher::Observer {
    unsigned idle = 0;
    unsigned closed = 0;
    void fetcherIdle(StreamFetcher&) override { ++idle; }
    void fetcherClosed(StreamFetcher&) override { ++closed; }
  };
  Counting observer;

  void observe() {
    observer.idle = 0;
    observer.closed = 0;
    fetcher->setObserver(observer);
  }

  ~FetcherWorld() noexcept(false) {
    if (fetcher.get() != nullptr) fetcher->setObserver(nullptr);
  }

  explicit FetcherWorld(bool tcp): tcp(tcp) {
    limit = 3 * kj::SECONDS;
  }

  StreamFetcher::Settings settings() {
    StreamFetcher::Settings s;
    s.timer = timer;
    return s;
  }

  void connect() {
    auto t = tcp ? tcpTransport(io) : pipeTransport();
    if (tls) t.client = tlsLike(kj::mv(t.client));
    srv = kj::heap<Srv>(*this, kj::mv(t.server));
    fetcher = kj::heap<StreamFetcher>(kj::mv(t.client), table, settings());
    observe();
    open = true;
    completed = 0;
    run = 0;
    requestWritten = false;
  }

  void expectClosed(kj::Vector<CloseKind> acceptable, kj::StringPtr why) {
    // The model says the connection was dropped: the fetcher is CLOSED (once what the network
    // carries has arrived), with one of `acceptable` kinds and a reason, and the connection ends.
    waitFor([this]() { return fetcher->getState() == State::CLOSED; });
    KJ_ASSERT(fetcher->getState() == State::CLOSED, "the model says the connection was dropped",
        why, fetcher->getState());
    auto kind = fetcher->getCloseKind();
    bool ok = false;
    for (auto k: acceptable) ok = ok || k == kind;
    KJ_ASSERT(ok, "closed for another reason than the model's", why, kind,
        kj::strArray(KJ_MAP(k, acceptable) { return kj::str(k); }, ", "),
        orNone(fetcher->getCloseReason()));
    KJ_IF_SOME(reason, fetcher->getCloseReason()) {
      KJ_ASSERT(reason.size() > 0);
    } else {
      KJ_FAIL_ASSERT("CLOSED without a reason");
    }
    srv->expectEnd(why);
    // Observer: "fetcherClosed(): The fetcher is CLOSED and its connection closed", once.
    KJ_ASSERT(observer.closed == 1, "fetcherClosed() calls", observer.closed);
    // Bytes past a response may come once it is over: the exchange then completed first.
    uint64_t extra = fetcher->getCompletedRequests() - completed;
    KJ_ASSERT(extra == 0 || (extra == 1 && kind == CloseKind::UNSOLICITED_BYTES),
        "completed requests drifted", fetcher->getCompletedRequests(), completed);
    KJ_ASSERT(observer.idle == fetcher->getCompletedRequests(), "fetcherIdle() calls drifted",
        observer.idle, fetcher->getCompletedRequests());
    ++coverage.kinds[unsigned(kind)];
    open = false;
    kinds = kj::mv(acceptable);
  }

  void expectIdle(kj::StringPtr why) {
    turns(ws);
    KJ_ASSERT(fetcher->getState() == State::IDLE, "the model says the connection is kept", why,
        fetcher->getState(), fetcher->getCloseKind(), orNone(fetcher->getCloseReason()));
    KJ_ASSERT(fetcher->getCompletedRequests() == completed, "completed requests drifted",
        fetcher->getCompletedRequests(), completed);
    // Observer: "fetcherIdle(): The connection came back", once per clean exchange.
    KJ_ASSERT(observer.idle == completed, "fetcherIdle() calls drifted", observer.idle, completed);
    KJ_ASSERT(observer.closed == 0, "fetcherClosed() while IDLE", observer.closed);
  }
};

kj::String pokeBytes(unsigned step) {
  return kj::str("HTTP/1.1 200 OK\r\nX-Id: poke", step, "\r\nContent-Length: 4\r\n\r\nPOKE");
}

void fetcherStep(FetcherWorld& w, Rng& rng, unsigned step, unsigned& nextId,
    kj::Vector<kj::String>& log) {
  auto& ws = w.ws;
  if (!w.open) {
    if (rng.chance(40)) {
      // A request on a CLOSED fetcher fails at once (DISCONNECTED, with the reason), writing
      // nothing; release() fails (FAILED).
      log.add(kj::str(step, ": request on CLOSED, then release()"));
      auto h = w.headers();
      auto ex = thrownBy([&]() { w.fetcher->request(kj::HttpMethod::GET, "/refused", h); },
          "request() on a CLOSED fetcher");
      KJ_ASSERT(ex.getType() == kj::Exception::Type::DISCONNECTED, ex);
      auto ex2 = thrownBy([&]() { w.fetcher->release(); }, "release() on a CLOSED fetcher");
      KJ_ASSERT(ex2.getType() == kj::Exception::Type::FAILED, ex2);
      KJ_ASSERT(w.fetcher->getState() == State::CLOSED);
      return;
    }
    log.add(kj::str(step, ": recreate (after CLOSED)"));
    w.fetcher = nullptr;
    w.srv = nullptr;
    w.connect();
    return;
  }

  if (rng.chance(15)) w.stale.response = nullptr;
  unsigned r = rng.below(100);
  if (w.cleanPercent > 50 && r >= 70 && rng.chance(60)) r = 0;  // mostly requests
  if (r < 70) {
    auto e = generate(rng, nextId++, false, w.cleanPercent);
    auto v = verdictOf(e);
    log.add(kj::str(step, ": ", e.describe(), "  => ", v.describe()));
    Hooks hooks{[&]() -> Srv& { return *w.srv; }, *w.fetcher, nullptr, true, w.stale};
    auto o = runExchange(w, *w.fetcher, e, hooks, v);
    w.requestWritten = true;
    // "lastExchangeReceivedResponse(): Whether the last exchange received any byte of a
    // response"; "lastExchangeWroteRequest(): Whether any byte of the last exchange's request
    // reached the connection". Each is this exchange's, never left over from the one before.
    bool received = !(e.action == Action::DROP_REQ_BODY ||
        (e.action == Action::DROP_PROMISE && !e.dropAfterPart));
    KJ_ASSERT(w.fetcher->lastExchangeWroteRequest(), "the server read this request");
    if (e.action != Action::DROP_PROMISE || (!e.dropAfterPart && !e.continueEarly)) {
      // (Part of a head, or a 100 Continue, sent just before the promise is dropped may or may
      // not have been read by then.)
      KJ_ASSERT(w.fetcher->lastExchangeReceivedResponse() == received,
          "lastExchangeReceivedResponse() is not this exchange's", received);
    }
    if (v.reusable) {
      ++w.completed;
      ++w.run;
      coverage.longestRun = kj::max(coverage.longestRun, w.run);
      w.expectIdle("a clean exchange");
    } else {
      w.expectClosed(kj::mv(v.kinds), "the exchange ended reuse");
    }
    (void)o;
  } else if (r < 73) {
    log.add(kj::str(step, ": idle, the server closes, and a request at once"));
    ++coverage.idleOps;
    w.srv->shutdown();
    w.srv->flush();
    auto h = w.headers();
    KJ_IF_SOME(ex, kj::runCatchingExceptions([&]() {
      auto req = w.fetcher->request(kj::HttpMethod::GET, "/after-close", h);
      req.body = nullptr;
      w.failureOf(kj::mv(req.response));
      KJ_ASSERT(!w.fetcher->lastExchangeWroteRequest(), "a request after the server closed");
      KJ_ASSERT(!w.fetcher->lastExchangeReceivedResponse());
    })) {
      KJ_ASSERT(ex.getType() == kj::Exception::Type::DISCONNECTED, ex);
    }
    // "An idle connection that the peer closes is noticed before it is handed out": the request
    // is never written (expectEnd() checks that the server reads nothing).
    kj::Vector<CloseKind> k;
    k.add(CloseKind::PEER_CLOSED_IDLE);
    w.expectClosed(kj::mv(k), "the server closed the idle connection, then a request");
  } else if (r < 75) {
    log.add(kj::str(step, ": idle, quiet"));
    w.settle(kj::MILLISECONDS);
    w.expectIdle("nothing happened");
  } else if (r < 79) {
    log.add(kj::str(step, ": idle, the server closes"));
    w.srv->shutdown();
    kj::Vector<CloseKind> k;
    k.add(CloseKind::PEER_CLOSED_IDLE);
    w.expectClosed(kj::mv(k), "the server closed the idle connection");
  } else if (r < 83) {
    log.add(kj::str(step, ": idle, the server sends unsolicited bytes"));
    w.srv->send(pokeBytes(step));
    kj::Vector<CloseKind> k;
    k.add(CloseKind::UNSOLICITED_BYTES);
    w.expectClosed(kj::mv(k), "bytes while idle");
    // "serverSpokeFirst(): ... dropped because the server sent bytes before any request was
    // written on it"
    KJ_ASSERT(w.fetcher->serverSpokeFirst() == !w.requestWritten, w.requestWritten);
  } else if (r < 86) {
    log.add(kj::str(step, ": idle, the server sends bytes, and a request at once"));
    w.srv->send(pokeBytes(step));
    w.srv->flush();
    auto h = w.headers();
    kj::Maybe<kj::Exception> failure;
    KJ_IF_SOME(ex, kj::runCatchingExceptions([&]() {
      auto req = w.fetcher->request(kj::HttpMethod::GET, "/after-poke", h);
      req.body = nullptr;
      failure = w.failureOf(kj::mv(req.response));
    })) {
      failure = kj::mv(ex);
    } else {
      // Sent nothing: "A request that failed before that ... is safe to retry".
      KJ_ASSERT(!w.fetcher->lastExchangeWroteRequest(), "a request after unsolicited bytes");
      KJ_ASSERT(!w.fetcher->lastExchangeReceivedResponse());
    }
    kj::Vector<CloseKind> k;
    k.add(CloseKind::UNSOLICITED_BYTES);
    // "drops the connection, with that reason, before a next request is written"
    w.expectClosed(kj::mv(k), "bytes while idle, then a request");
  } else if (r < 93) {
    log.add(kj::str(step, ": release() while idle, wrap the stream in a new StreamFetcher"));
    ++coverage.releases;
    auto stream = w.fetcher->release();
    KJ_ASSERT(w.fetcher->getState() == State::RELEASED);
    auto ex = thrownBy([&]() { w.fetcher->release(); }, "release() twice");
    KJ_ASSERT(ex.getType() == kj::Exception::Type::FAILED, ex);
    auto h = w.headers();
    auto ex2 = thrownBy([&]() { w.fetcher->request(kj::HttpMethod::GET, "/released", h); },
        "request() on a RELEASED fetcher");
    KJ_ASSERT(ex2.getType() == kj::Exception::Type::FAILED, ex2);
    if (rng.chance(50)) turns(ws, rng.below(4));
    w.fetcher = kj::heap<StreamFetcher>(kj::mv(stream), w.table, w.settings());
    w.observe();
    w.completed = 0;
    w.expectIdle("a wrapped released stream");
  } else if (r < 96) {
    unsigned k = rng.below(4);
    log.add(kj::str(step, ": idle, the server sends bytes, release() after ", k, " turns"));
    auto poke = pokeBytes(step);
    w.srv->send(kj::str(poke));
    turns(ws, k);
    kj::Own<kj::AsyncIoStream> stream;
    KJ_IF_SOME(ex, kj::runCatchingExceptions([&]() { stream = w.fetcher->release(); })) {
      // Seen already: the fetcher dropped the connection for them.
      KJ_ASSERT(ex.getType() == kj::Exception::Type::FAILED, ex);
      kj::Vector<CloseKind> kinds;
      kinds.add(CloseKind::UNSOLICITED_BYTES);
      w.expectClosed(kj::mv(kinds), "bytes while idle, seen before release()");
      return;
    }
    // "release() ... with nothing lost: bytes already read from it come first"
    ++coverage.releasedWithBytes;
    if (rng.chance(50)) {
      // Wrapped in a new StreamFetcher, the bytes are unsolicited there too, and the new
      // fetcher says whether the server spoke before any request was written on the connection.
      log.add(kj::str(step, ":   ... and the released stream wrapped in a new StreamFetcher"));
      w.fetcher = kj::heap<StreamFetcher>(kj::mv(stream), w.table, w.settings());
      w.observe();
      w.completed = 0;
      kj::Vector<CloseKind> kinds;
      kinds.add(CloseKind::UNSOLICITED_BYTES);
      w.expectClosed(kj::mv(kinds), "a released stream with unsolicited bytes, wrapped");
      // "serverSpokeFirst(): Whether the connection was dropped because the server sent bytes
      // before any request was written on it"
      KJ_ASSERT(w.fetcher->serverSpokeFirst() == !w.requestWritten, w.requestWritten,
          orNone(w.fetcher->getCloseReason()));
      return;
    }
    auto got = kj::heapArray<char>(poke.size());
    size_t n = 0;
    while (n < poke.size()) {
      size_t m = w.bounded(stream->tryRead(got.begin() + n, 1, poke.size() - n));
      KJ_ASSERT(m > 0, "the released stream lost bytes", n, poke.size());
      n += m;
    }
    KJ_ASSERT(kj::heapString(got.begin(), n) == poke, "the released stream lost bytes");
    stream = nullptr;
    w.srv->expectEnd("a released stream dropped");
    w.fetcher = nullptr;
    w.srv = nullptr;
    w.connect();
  } else {
    log.add(kj::str(step, ": destroy the idle fetcher, connect anew"));
    w.fetcher = nullptr;
    w.srv->expectEnd("the fetcher was destroyed");
    w.srv = nullptr;
    w.connect();
  }
}

void runFetcherSeedOn(bool tcp, uint64_t seed, bool tls) {
  FetcherWorld w(tcp);
  w.tls = tls;
  Rng rng(Rng(seed).next());
  w.cleanPercent = seed % 2 == 0 ? 85 : 40;
  kj::Vector<kj::String> log;
  unsigned nextId = 1;
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
    w.connect();
    for (unsigned step = 0; step < STEPS; step++) fetcherStep(w, rng, step, nextId, log);
    if (getenv("MODEL_TEST_VERBOSE") != nullptr) KJ_LOG(WARNING, seed, joined(log));
  })) {
    KJ_FAIL_EXPECT("StreamFetcher model: a seed failed; replay with MODEL_TEST_SEED", seed,
        tls ? "tls-like" : tcp ? "tcp" : "pipe", e, joined(log));
  }
}

void runFetcherSeed(bool tcp, uint64_t seed) {
  runFetcherSeedOn(tcp, seed, false);
}

void runTlsLikeSeed(bool, uint64_t seed) {
  runFetcherSeedOn(true, seed, true);
}

// =================================================================================================
// ConnectionPool: the model and the world.

struct PoolWorld: public LoopEnv {
  bool tcp;
  bool tls = false;  // connections are test::tlsLike() over TCP
  kj::TimerImpl poolTimer{kj::origin<kj::TimePoint>()};
  kj::Own<kj::NetworkAddress> address;
  kj::Own<kj::ConnectionReceiver> listener;
  kj::Vector<kj::Own<Srv>> srvs;  // one per connection, in the order opened
  kj::Own<ConnectionPool> pool;
  Stale stale;
  const kj::Duration idleTimeout = 100 * kj::SECONDS;

  // The model.
  ConnectionPool::Stats stats;
  kj::Maybe<unsigned> idle;  // the idle connection (index in srvs), if any
  kj::TimePoint idleSince = kj::origin<kj::TimePoint>();

  bool streamBodies = false;  // maxReplayBodyBytes = 0: request bodies are never buffered
  unsigned cleanPercent = 50;
  ConnectionPool::Settings settings;
  uint64_t uses = 0;  // requests the current connection carried

  bool keeps(uint64_t served) {
    return !settings.neverReuse &&
        (settings.maxRequestsPerConnection == 0 || served < settings.maxRequestsPerConnection);
  }

  explicit PoolWorld(bool tcp): tcp(tcp) {
    limit = 3 * kj::SECONDS;
    if (tcp) {
      auto& network = io.provider->getNetwork();
      auto listenAddress = network.parseAddress("127.0.0.1", 0).wait(ws);
      listener = listenAddress->listen();
      address = network.parseAddress("127.0.0.1", listener->getPort()).wait(ws);
    }
  }

  Connector connector() {
    return [this]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      if (!tcp) {
        auto t = pipeTransport();
        srvs.add(kj::heap<Srv>(*this, kj::mv(t.server)));
        return kj::mv(t.client);
      }
      auto accepted = listener->accept();
      return address->connect().then([this, accepted = kj::mv(accepted)](
          kj::Own<kj::AsyncIoStream> client) mutable {
        return accepted.then([this, client = kj::mv(client)](
            kj::Own<kj::AsyncIoStream> server) mutable {
          srvs.add(kj::heap<Srv>(*this, kj::mv(server)));
          if (tls) return tlsLike(kj::mv(client));
          return kj::mv(client);
        });
      });
    };
  }

  void create() {
    ConnectionPool::Settings s;
    s.maxConnections = 4;
    s.maxIdleConnections = 4;
    s.idleTimeout = idleTimeout;
    s.waitTimeout = 10000 * kj::SECONDS;
    s.connectTimeout = 10000 * kj::SECONDS;
    s.fetcher.timer = timer;
    if (streamBodies) s.maxReplayBodyBytes = 0;
    s.maxRequestsPerConnection = settings.maxRequestsPerConnection;
    s.neverReuse = settings.neverReuse;
    pool = kj::heap<ConnectionPool>(poolTimer, table, connector(), s);
    stats = ConnectionPool::Stats();
    idle = nullptr;
  }

  static kj::String show(const ConnectionPool::Stats& s) {
    return kj::str("opened=", s.connectionsOpened, " requests=", s.requests, " reuses=", s.reuses,
        " retries=", s.retries, " waits=", s.waits, " overloaded=", s.overloaded,
        " peerClosedIdle=", s.droppedPeerClosedIdle, " unsolicited=", s.droppedUnsolicitedBytes,
        " connectionClose=", s.droppedConnectionClose, " notReusable=", s.droppedNotReusable,
        " abandoned=", s.droppedAbandoned, " requestIncomplete=", s.droppedRequestIncomplete,
        " stale=", s.droppedStale, " failed=", s.droppedFailed, " idleTimeout=",
        s.droppedIdleTimeout, " idleLimit=", s.droppedIdleLimit, " maxRequests=",
        s.droppedMaxRequests, " neverReuse=",
        s.droppedNeverReuse, " forRetry=", s.droppedForRetry);
  }

  static bool same(const ConnectionPool::Stats& a, const ConnectionPool::Stats& b) {
    return a.connectionsOpened == b.connectionsOpened && a.connectFailures == b.connectFailures &&
        a.requests == b.requests && a.reuses == b.reuses && a.retries == b.retries &&
        a.waits == b.waits && a.overloaded == b.overloaded &&
        a.droppedPeerClosedIdle == b.droppedPeerClosedIdle &&
        a.droppedUnsolicitedBytes == b.droppedUnsolicitedBytes &&
        a.droppedConnectionClose == b.droppedConnectionClose &&
        a.droppedNotReusable == b.droppedNotReusable && a.droppedUpgraded == b.droppedUpgraded &&
        a.droppedAbandoned == b.droppedAbandoned &&
        a.droppedRequestIncomplete == b.droppedRequestIncomplete &&
        a.droppedStale == b.droppedStale && a.droppedFailed == b.droppedFailed &&
        a.droppedIdleTimeout == b.droppedIdleTimeout &&
        a.droppedIdleLimit == b.droppedIdleLimit && a.droppedMaxRequests == b.droppedMaxRequests &&
        a.droppedNeverReuse == b.droppedNeverReuse && a.droppedForRetry == b.droppedForRetry;
  }

  static uint64_t ConnectionPool::Stats::*counterOf(CloseKind kind) {
    switch (kind) {
      case CloseKind::PEER_CLOSED_IDLE: return &ConnectionPool::Stats::droppedPeerClosedIdle;
      case CloseKind::UNSOLICITED_BYTES: return &ConnectionPool::Stats::droppedUnsolicitedBytes;
      case CloseKind::CONNECTION_CLOSE: return &ConnectionPool::Stats::droppedConnectionClose;
      case CloseKind::NOT_REUSABLE: return &ConnectionPool::Stats::droppedNotReusable;
      case CloseKind::UPGRADED: return &ConnectionPool::Stats::droppedUpgraded;
      case CloseKind::ABANDONED: return &ConnectionPool::Stats::droppedAbandoned;
      case CloseKind::REQUEST_INCOMPLETE: return &ConnectionPool::Stats::droppedRequestIncomplete;
      case CloseKind::FAILED: return &ConnectionPool::Stats::droppedFailed;
      case CloseKind::NONE: break;
    }
    KJ_UNREACHABLE;
  }

  using Counter = uint64_t ConnectionPool::Stats::*;

  void expectStats(kj::ArrayPtr<const CloseKind> oneOf, kj::StringPtr why) {
    auto counters = KJ_MAP(k, oneOf) { return counterOf(k); };
    expectCounted(counters, why);
  }

  void expectCounted(kj::ArrayPtr<const Counter> oneOf, kj::StringPtr why) {
    // The pool's counters are the model's, with one more drop under one of `oneOf` (if any);
    // then the model takes the one the pool chose.
    auto matches = [&]() -> bool {
      auto& s = pool->getStats();
      if (oneOf.size() == 0) return same(s, stats);
      for (auto c: oneOf) {
        auto expected = stats;
        ++(expected.*c);
        if (same(s, expected)) return true;
      }
      return false;
    };
    if (!matches()) waitFor(matches);
    KJ_ASSERT(matches(), "the pool's counters drifted from the model's", why,
        show(pool->getStats()), show(stats), oneOf.size());
    stats = pool->getStats();
    unsigned expectedOpen = idle == nullptr ? 0 : 1;
    KJ_ASSERT(pool->getOpenCount() == expectedOpen, pool->getOpenCount(), expectedOpen, why);
    KJ_ASSERT(pool->getIdleCount() == expectedOpen, pool->getIdleCount(), expectedOpen, why);
    KJ_ASSERT(pool->getWaitingCount() == 0);
  }
};

void poolStep(PoolWorld& w, Rng& rng, unsigned step, unsigned& nextId,
    kj::Vector<kj::String>& log) {
  if (rng.chance(15)) w.stale.response = nullptr;
  unsigned r = rng.below(100);
  if (w.cleanPercent > 50 && r >= 75 && rng.chance(60)) r = 0;  // mostly requests
  if (r < 75) {
    auto e = generate(rng, nextId++, true, w.cleanPercent, w.streamBodies);
    auto v = verdictOf(e);
    bool reuse = w.idle != nullptr;
    log.add(kj::str(step, ": ", e.describe(), "  => ", v.describe(),
        reuse ? " (reusing)" : " (new connection)"));
    if (!reuse) w.uses = 0;
    unsigned target = 0;
    KJ_IF_SOME(i, w.idle) {
      target = i;
    } else {
      target = w.srvs.size();
    }
    Hooks hooks{[&]() -> Srv& {
      w.waitFor([&]() { return w.srvs.size() > target; });
      KJ_ASSERT(w.srvs.size() > target, "the pool opened no connection");
      return *w.srvs[target];
    }, nullptr, *w.pool, w.keeps(w.uses + 1), w.stale};
    w.idle = nullptr;
    ++w.stats.requests;
    if (reuse) {
      ++coverage.reused;
      ++w.stats.reuses;
    } else {
      ++w.stats.connectionsOpened;
    }
    auto o = runExchange(w, *w.pool, e, hooks, v);
    // Bytes sent once the connection is idle again follow a clean exchange: the connection came
    // back first (and may have been retired then, never seeing them).
    bool laterOnly = !v.reusable && e.stray == Stray::LATER && o.sentLater &&
        v.kinds.size() == 1 && v.kinds[0] == CloseKind::UNSOLICITED_BYTES;
    // Glued bytes written as a piece of their own may come once the exchange is over, too.
    bool maybeLate = !v.reusable && (e.stray == Stray::GLUED || e.stray == Stray::BODILESS_BODY)
        && e.cuts.size() > 0 && v.kinds.size() == 1 &&
        v.kinds[0] == CloseKind::UNSOLICITED_BYTES && !w.keeps(w.uses + 1);
    if (maybeLate) {
      PoolWorld::Counter either[] = {&ConnectionPool::Stats::droppedUnsolicitedBytes,
          w.settings.neverReuse ? &ConnectionPool::Stats::droppedNeverReuse
                                : &ConnectionPool::Stats::droppedMaxRequests};
      w.expectCounted(either, "glued bytes in a piece of their own, on a retiring connection");
      w.srvs[target]->expectEnd("glued bytes");
    } else if (v.reusable || laterOnly) {
      turns(w.ws);
      ++w.uses;
      coverage.longestRun = kj::max(coverage.longestRun, w.uses);
      if (w.settings.neverReuse) {
        // "Close every connection after one request"
        ++w.stats.droppedNeverReuse;
        w.expectStats(nullptr, "neverReuse");
        w.srvs[target]->expectEnd("neverReuse");
      } else if (!w.keeps(w.uses)) {
        // "A connection that served this many requests is closed instead of reused"
        ++w.stats.droppedMaxRequests;
        w.expectStats(nullptr, "maxRequestsPerConnection");
        w.srvs[target]->expectEnd("maxRequestsPerConnection");
      } else if (laterOnly) {
        w.expectStats(v.kinds.asPtr(), "bytes once idle");
        w.srvs[target]->expectEnd("bytes once idle");
      } else {
        w.idle = target;
        w.idleSince = w.poolTimer.now();
        w.expectStats(nullptr, "a clean exchange");
      }
    } else {
      w.expectStats(v.kinds.asPtr(), "the exchange ended reuse");
      w.srvs[target]->expectEnd("the pool dropped the connection");
    }
    KJ_ASSERT(w.srvs.size() == w.stats.connectionsOpened, w.srvs.size());
    return;
  }
  KJ_IF_SOME(i, w.idle) {
    if (r < 80) {
      log.add(kj::str(step, ": idle, the server closes"));
      w.srvs[i]->shutdown();
      w.idle = nullptr;
      CloseKind k[] = {CloseKind::PEER_CLOSED_IDLE};
      w.expectStats(k, "the server closed the idle connection");
      w.srvs[i]->expectEnd("closed while idle");
      return;
    } else if (r < 83) {
      // "An idle connection that the peer closes is noticed before it is handed out", or else
      // the request "fails on a *reused* connection before any byte of a response arrived" and
      // is sent once more on a new connection (a GET is idempotent).
      log.add(kj::str(step, ": idle, the server closes, and a GET at once"));
      ++coverage.idleOps;
      w.srvs[i]->shutdown();
      w.srvs[i]->flush();
      w.idle = nullptr;
      unsigned id = nextId++;
      auto path = kj::str("/r", id);
      kj::HttpHeaders h(w.table);
      auto req = w.pool->request(kj::HttpMethod::GET, path, h);
      req.body = nullptr;
      unsigned target = w.srvs.size();
      w.waitFor([&]() { return w.srvs.size() > target; });
      KJ_ASSERT(w.srvs.size() > target, "the pool opened no new connection");
      auto& srv = *w.srvs[target];
      auto text = srv.readRequest();
      KJ_ASSERT(text.startsWith(kj::str("GET ", path, " HTTP/1.1\r\n")), text);
      auto body = kj::str("<after close ", id, ">");
      srv.send(kj::str("HTTP/1.1 200 OK\r\nX-Id: ", id, "\r\nContent-Length: ", body.size(),
          "\r\n\r\n", body));
      auto response = w.bounded(kj::mv(req.response));
      KJ_ASSERT(response.statusCode == 200);
      KJ_ASSERT(w.bounded(response.body->readAllText()) == body);
      response.body = nullptr;
      turns(w.ws);
      w.srvs[i]->expectEnd("closed while idle, then a request");
      ++w.stats.requests;
      ++w.stats.connectionsOpened;
      ++w.uses;
      // Either noticed first (counted as closed while idle), or found stale and retried.
      auto& got = w.pool->getStats();
      // Retried, the first connection is counted as stale (it failed under the request) or as
      // closed by the server while idle (found lost as the request started, before any of it
      // was written: "the request never reached the connection at all").
      bool retried = got.retries == w.stats.retries + 1;
      if (retried) {
        ++w.stats.retries;
        ++w.stats.reuses;
      }
      w.uses = 1;
      if (w.settings.neverReuse) {
        ++w.stats.droppedNeverReuse;
      } else if (!w.keeps(w.uses)) {
        ++w.stats.droppedMaxRequests;
      } else {
        w.idle = target;
        w.idleSince = w.poolTimer.now();
      }
      PoolWorld::Counter closedIdle[] = {&ConnectionPool::Stats::droppedPeerClosedIdle};
      PoolWorld::Counter either[] = {&ConnectionPool::Stats::droppedStale,
          &ConnectionPool::Stats::droppedPeerClosedIdle};
      if (retried) {
        w.expectCounted(either, "closed while idle, then a request (retried)");
      } else {
        w.expectCounted(closedIdle, "closed while idle, then a request");
      }
      return;
    } else if (r < 85) {
      log.add(kj::str(step, ": idle, the server sends unsolicited bytes"));
      w.srvs[i]->send(pokeBytes(step));
      w.idle = nullptr;
      CloseKind k[] = {CloseKind::UNSOLICITED_BYTES};
      w.expectStats(k, "bytes while idle");
      w.srvs[i]->expectEnd("bytes while idle");
      return;
    }
  }
  if (r < 93) {
    bool expire = rng.chance(40);
    auto d = expire ? w.idleTimeout + 1 * kj::SECONDS : 7 * kj::SECONDS;
    w.poolTimer.advanceTo(w.poolTimer.now() + d);
    turns(w.ws);
    bool expired = false;
    KJ_IF_SOME(i, w.idle) {
      if (w.poolTimer.now() - w.idleSince > w.idleTimeout) {
        // "An idle connection unused this long is closed"
        expired = true;
        w.idle = nullptr;
        ++w.stats.droppedIdleTimeout;
        w.expectStats(nullptr, "idle past idleTimeout");
        w.srvs[i]->expectEnd("idle past idleTimeout");
      }
    }
    log.add(kj::str(step, ": the pool's timer moves ", d / kj::SECONDS, "s",
        expired ? " (the idle connection expires)" : ""));
    if (!expired) w.expectStats(nullptr, "time passed");
    return;
  }
  log.add(kj::str(step, ": destroy the pool, create it anew"));
  w.pool = nullptr;
  KJ_IF_SOME(i, w.idle) {
    w.srvs[i]->expectEnd("the pool was destroyed");
  }
  w.create();
  // Connections from the old pool are all closed; the new pool's count from the next one.
  w.stats.connectionsOpened = 0;
  w.srvs.clear();
}

void runPoolSeedOn(bool tcp, uint64_t seed, bool tls) {
  PoolWorld w(tcp);
  w.tls = tls;
  w.streamBodies = seed % 2 == 1;
  Rng rng(Rng(seed ^ 0x5eed).next());
  w.cleanPercent = seed % 4 < 2 ? 85 : 40;
  if (seed % 3 == 1) w.settings.maxRequestsPerConnection = 1 + rng.below(4);
  w.settings.neverReuse = seed % 8 == 5;
  kj::Vector<kj::String> log;
  unsigned nextId = 1;
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
    w.create();
    for (unsigned step = 0; step < STEPS; step++) poolStep(w, rng, step, nextId, log);
    if (getenv("MODEL_TEST_VERBOSE") != nullptr) KJ_LOG(WARNING, seed, joined(log));
  })) {
    KJ_FAIL_EXPECT("ConnectionPool model: a seed failed; replay with MODEL_TEST_SEED", seed,
        tls ? "tls-like" : tcp ? "tcp" : "pipe", e, joined(log));
  }
}

void runPoolSeed(bool tcp, uint64_t seed) {
  runPoolSeedOn(tcp, seed, false);
}

void runTlsLikePoolSeed(bool, uint64_t seed) {
  runPoolSeedOn(true, seed, true);
}

template <typename Run>
void forEachSeed(Run&& run, bool tcp, bool pool, unsigned seeds) {
  coverage = Coverage();
  KJ_IF_SOME(only, onlySeed()) {
    run(tcp, only);
    return;
  }
  for (uint64_t seed = 1; seed <= seeds; seed++) run(tcp, seed);
  // The seeds reached every path the model knows (else a change to the generator or the world
  // silently stopped exercising one).
  for (unsigned a = 0; a < 10; a++) {
    if (pool && (Action(a) == Action::CONCURRENT || Action(a) == Action::RELEASE_BUSY)) continue;
    KJ_EXPECT(coverage.actions[a] > 0, "no exchange did this", name(Action(a)));
  }
  KJ_EXPECT(coverage.idleOps > 0);
  KJ_EXPECT(coverage.longestRun >= 10, coverage.longestRun);
  if (pool) {
    KJ_EXPECT(coverage.reused > 50, coverage.reused);
  } else {
    KJ_EXPECT(coverage.releases > 0);
    KJ_EXPECT(coverage.releasedWithBytes > 0);
    for (auto k: {CloseKind::PEER_CLOSED_IDLE, CloseKind::UNSOLICITED_BYTES,
             CloseKind::CONNECTION_CLOSE, CloseKind::NOT_REUSABLE, CloseKind::ABANDONED,
             CloseKind::FAILED}) {
      KJ_EXPECT(coverage.kinds[unsigned(k)] > 0, "no connection was dropped so", k);
    }
  }
}

// -------------------------------------------------------------------------------------------------
// Fixed cases, one per distinct failure the seeds found.

kj::HttpClient::Response cancelOneRead(LoopEnv& env, kj::HttpClient& client,
    kj::Function<Srv&()> server) {
  // A GET answered with 10 bytes of body, of which 3 come first: the caller reads them, starts a
  // read for more, cancels it, and then the other 7 arrive.
  auto h = env.headers();
  auto req = client.request(kj::HttpMethod::GET, "/r1", h);
  req.body = nullptr;
  auto& srv = server();
  KJ_ASSERT(srv.readRequest().startsWith("GET /r1 HTTP/1.1\r\n"));
  srv.send(kj::str("HTTP/1.1 200 OK\r\nX-Id: 1\r\nContent-Length: 10\r\n\r\n012"));
  auto response = env.bounded(kj::mv(req.response));
  char buffer[16];
  size_t got = 0;
  while (got < 3) got += env.bounded(response.body->tryRead(buffer + got, 1, 3 - got));
  KJ_ASSERT(kj::heapString(buffer, 3) == "012");
  {
    auto pending = response.body->tryRead(buffer, 1, sizeof(buffer));
    KJ_ASSERT(!pending.poll(env.ws));
  }
  srv.send(kj::str("3456789"));
  turns(env.ws, 3);
  return response;
}

void cancelledReadThenRead(bool tcp) {
  FetcherWorld w(tcp);
  w.connect();
  auto response = cancelOneRead(w, *w.fetcher, [&]() -> Srv& { return *w.srv; });
  char buffer[16];
  auto e = w.failureOf(kj::evalNow([&]() {
    return response.body->tryRead(buffer, 1, sizeof(buffer));
  }));
  KJ_EXPECT(contains(e.getDescription(), "cancelled"), e);
  response.body = nullptr;
  w.waitFor([&]() { return w.fetcher->getState() == State::CLOSED; });
  KJ_ASSERT(w.fetcher->getState() == State::CLOSED, w.fetcher->getState());
  KJ_EXPECT(w.fetcher->getCloseKind() == CloseKind::ABANDONED, tcp ? "tcp" : "pipe",
      w.fetcher->getCloseKind(), orNone(w.fetcher->getCloseReason()));
}

// stream-fetcher.h: CloseKind::ABANDONED is "a body dropped early, a request or read cancelled",
// FAILED "the request or response failed (I/O error, malformed response)". A body read cancelled
// while waiting for more bytes makes the next read fail (its place in the response is lost); the
// fetcher then closes as ABANDONED, the caller's doing, not as an I/O error or a bad response.
KJ_TEST("StreamFetcher model: a cancelled body read, then read again, closes the fetcher "
    "ABANDONED") {
  cancelledReadThenRead(false);
  cancelledReadThenRead(true);
}

// The same, seen through ConnectionPool's statistics: "droppedAbandoned: a body dropped early, a
// request cancelled", not "droppedFailed: any other failed exchange (I/O error, malformed
// response)".
KJ_TEST("ConnectionPool model: a connection dropped for a cancelled body read is counted as "
    "droppedAbandoned") {
  for (bool tcp: {false, true}) {
    PoolWorld w(tcp);
    w.create();
    auto response = cancelOneRead(w, *w.pool, [&]() -> Srv& {
      w.waitFor([&]() { return w.srvs.size() > 0; });
      return *w.srvs[0];
    });
    char buffer[16];
    w.failureOf(kj::evalNow([&]() { return response.body->tryRead(buffer, 1, sizeof(buffer)); }));
    response.body = nullptr;
    w.waitFor([&]() { return w.pool->getStats().dropped() == 1; });
    auto& s = w.pool->getStats();
    KJ_EXPECT(s.dropped() == 1, PoolWorld::show(s));
    KJ_EXPECT(s.droppedAbandoned == 1 && s.droppedFailed == 0, tcp ? "tcp" : "pipe",
        PoolWorld::show(s));
  }
}

// Contrast: the same cancelled read followed by dropping the body, without reading again,
// is ABANDONED, as documented, and the connection is closed without another byte written.
KJ_TEST("StreamFetcher model: a cancelled body read, then the body dropped, is ABANDONED") {
  for (bool tcp: {false, true}) {
    FetcherWorld w(tcp);
    w.connect();
    auto response = cancelOneRead(w, *w.fetcher, [&]() -> Srv& { return *w.srv; });
    response.body = nullptr;
    w.waitFor([&]() { return w.fetcher->getState() == State::CLOSED; });
    KJ_ASSERT(w.fetcher->getState() == State::CLOSED, w.fetcher->getState());
    KJ_EXPECT(w.fetcher->getCloseKind() == CloseKind::ABANDONED, w.fetcher->getCloseKind());
    w.srv->expectEnd("abandoned");
  }
}

// -------------------------------------------------------------------------------------------------
// The seeded runs. Each checks, at every step, the model's prediction (see the head comment).

KJ_TEST("StreamFetcher model: long seeded sequences on one fetcher (in-process pipe)") {
  forEachSeed(runFetcherSeed, false, false, FETCHER_SEEDS);
}

KJ_TEST("StreamFetcher model: long seeded sequences on one fetcher (loopback TCP)") {
  forEachSeed(runFetcherSeed, true, false, FETCHER_SEEDS);
}

KJ_TEST("StreamFetcher model: long seeded sequences on one fetcher (loopback TCP, TLS-like)") {
  forEachSeed(runTlsLikeSeed, true, false, POOL_SEEDS);
}

KJ_TEST("ConnectionPool model: long seeded sequences on one pool (in-process pipe)") {
  forEachSeed(runPoolSeed, false, true, POOL_SEEDS);
}

KJ_TEST("ConnectionPool model: long seeded sequences on one pool (loopback TCP)") {
  forEachSeed(runPoolSeed, true, true, POOL_SEEDS);
}

KJ_TEST("ConnectionPool model: long seeded sequences on one pool (loopback TCP, TLS-like)") {
  forEachSeed(runTlsLikePoolSeed, true, true, 8);
}

}  // namespace
}  // namespace test
}  // namespace sockfetch
