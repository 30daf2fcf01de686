// Split invariance of ResponseFramer: a response must be framed the same way whatever the
// boundaries of the reads that delivered it. A framer whose verdict depends on where the kernel
// happened to cut the stream is one an upstream can steer by timing its writes: the same bytes
// would be accepted or rejected, reused or dropped, depending on packetization.
//
// Every response of a corpus (well-formed, unusual and malformed) is fed whole, byte by byte, cut
// once at every position, and cut at pseudo-random positions, with three kinds of owner: one that
// takes everything at once, one that takes a byte at a time, and one that lets body data bypass
// the framer (receivedDirect(), as FramedStream does). What was passed on, completeness, residue,
// failure and the reuse verdict must be the same every time, and what was passed on must be a
// prefix of the response (interim responses removed, chunk extensions too) that never reaches
// past its end.

#include "response-framer.h"

#include <sockfetch/kj-compat.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/vector.h>
#include <string.h>

namespace sockfetch {
namespace {

#define BYTES(literal) kj::arrayPtr(literal, sizeof(literal) - 1)
// A string literal as bytes, embedded NULs included.

enum class Expect { COMPLETE, INCOMPLETE, FAIL };

struct Case {
  kj::StringPtr name;
  kj::ArrayPtr<const char> response;  // the final response (what may be passed on, at most)
  Expect expect;
  kj::ArrayPtr<const char> interim = nullptr;  // interim (1xx) responses sent before it
  kj::ArrayPtr<const char> residue = nullptr;  // bytes that follow the response
  kj::HttpMethod method = kj::HttpMethod::GET;
  bool eof = false;           // the connection ends after the input
  size_t withheld = 0;        // trailing bytes of `response` never passed on (chunked trailers)
  ResponseFramer::Limits limits = {};
  kj::ArrayPtr<const char> passes = nullptr;
  // What is passed on where the framer rewrites the response (it removes chunk extensions, which
  // kj-http 0.9.2 rejects); by default, `response` less its `withheld` bytes.
};

kj::ArrayPtr<const char> passable(const Case& c) {
  if (c.passes != nullptr) return c.passes;
  return c.response.slice(0, c.response.size() - c.withheld);
}

enum class Owner { TAKE_ALL, TAKE_BYTE, DIRECT };

kj::StringPtr KJ_STRINGIFY(Owner owner) {
  switch (owner) {
    case Owner::TAKE_ALL: return "take-all";
    case Owner::TAKE_BYTE: return "take-byte";
    case Owner::DIRECT: return "direct";
  }
  KJ_UNREACHABLE;
}

struct Outcome {
  kj::String passed;
  bool complete = false;
  size_t residue = 0;
  bool failed = false;
  kj::String failure;
  bool hasHead = false;
  kj::String whyNot;

  kj::String describe() const {
    return kj::str("passed=", passed.size(), " complete=", complete, " residue=", residue,
        " failed=", failed, " (", failure, ") head=", hasHead, " whyNot=(", whyNot, ")");
  }
};

kj::String input(const Case& c) {
  return kj::str(c.interim, c.response, c.residue);
}

Outcome feedCase(const Case& c, kj::ArrayPtr<const size_t> cuts, Owner owner) {
  // Feeds the case's input cut at `cuts` (increasing offsets), one received() (or
  // receivedDirect()) per piece as far as the framer's space allows, taking what is passable
  // after each, and stopping at the first failure as FramedStream does.
  auto text = input(c);
  ResponseFramer framer(c.limits);
  framer.start(c.method);
  kj::Vector<char> passed;
  Outcome outcome;

  auto takeAll = [&]() {
    char out[4096];
    size_t room = owner == Owner::TAKE_BYTE ? 1 : sizeof(out);
    while (size_t n = framer.take(kj::arrayPtr(reinterpret_cast<kj::byte*>(out), room))) {
      passed.addAll(out, out + n);
    }
  };
  auto noteFailure = [&](const kj::Exception& e) {
    outcome.failed = true;
    outcome.failure = kj::str(e.getDescription());
  };

  size_t pos = 0;
  size_t cutIndex = 0;
  while (pos < text.size() && !outcome.failed) {
    size_t pieceEnd = cutIndex < cuts.size() ? cuts[cutIndex++] : text.size();
    while (pos < pieceEnd && !outcome.failed) {
      size_t direct = framer.directReadLimit();
      if (owner == Owner::DIRECT && direct > 0) {
        // Body bytes read straight into the consumer's buffer: passed on by construction.
        size_t n = kj::min(direct, pieceEnd - pos);
        passed.addAll(text.begin() + pos, text.begin() + pos + n);
        framer.receivedDirect(n);
        pos += n;
      } else {
        kj::ArrayPtr<kj::byte> space;
        KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { space = framer.space(); })) {
          noteFailure(e);  // FramedStream turns this into a failed read
          break;
        }
        size_t n = kj::min(space.size(), pieceEnd - pos);
        memcpy(space.begin(), text.begin() + pos, n);
        framer.received(n);
        pos += n;
      }
      takeAll();
      KJ_IF_SOME(e, framer.getFailure()) {
        noteFailure(e);
      }
    }
  }
  if (c.eof && !outcome.failed) {
    framer.receivedEof();
    takeAll();
    KJ_IF_SOME(e, framer.getFailure()) {
      noteFailure(e);
    }
  }
  outcome.passed = kj::heapString(passed.begin(), passed.size());
  outcome.complete = framer.isComplete();
  outcome.residue = framer.residueSize();
  outcome.hasHead = framer.hasHead();
  if (framer.hasHead()) {
    KJ_IF_SOME(why, framer.whyNotReusable()) {
      outcome.whyNot = kj::str(why);
    }
  }
  return outcome;
}

#define CHECK(cond, ...) \
  if (!(cond)) { \
    KJ_FAIL_EXPECT("failed: " #cond, ##__VA_ARGS__); \
    return false; \
  }
// Like KJ_EXPECT, but stops checking the run at its first failure (one report per case is
// enough to diagnose, and keeps the output readable).

bool checkAlone(const Case& c, const Outcome& o, kj::StringPtr how) {
  // What must hold for any one run, whatever the split.
  auto passable = sockfetch::passable(c);
  CHECK(o.passed.size() <= passable.size(), c.name, how, o.describe());
  size_t n = kj::min(o.passed.size(), passable.size());
  CHECK(memcmp(o.passed.begin(), passable.begin(), n) == 0,
      "passed bytes are not a prefix of the response", c.name, how, o.describe());
  switch (c.expect) {
    case Expect::COMPLETE:
      CHECK(!o.failed && o.complete && o.passed.size() == passable.size() &&
          o.residue == c.residue.size(), "expected complete", c.name, how, o.describe());
      break;
    case Expect::INCOMPLETE:
      CHECK(!o.failed && !o.complete && o.passed.size() == passable.size(),
          "expected incomplete", c.name, how, o.describe());
      break;
    case Expect::FAIL:
      CHECK(o.failed, "expected a failure", c.name, how, o.describe());
      CHECK(strstr(o.failure.cStr(), "malformed HTTP response") != nullptr ||
          strstr(o.failure.cStr(), "the connection closed") != nullptr ||
          strstr(o.failure.cStr(), "is not HTTP/1.x") != nullptr ||
          strstr(o.failure.cStr(), "is over a limit") != nullptr ||
          strstr(o.failure.cStr(), "kj-http cannot decode") != nullptr,
          c.name, how, o.failure);
      break;
  }
  return true;
}

bool checkSame(const Case& c, const Outcome& whole, const Outcome& o, kj::StringPtr how) {
  // A split changes nothing. For a failure, the bytes passed before it may differ (body bytes
  // pass as they come, so a split may pass fewer before the bad line), the verdict may not.
  CHECK(o.failed == whole.failed && o.failure == whole.failure, "split changed the verdict",
      c.name, how, whole.describe(), o.describe());
  if (whole.failed) return true;
  CHECK(o.passed == whole.passed && o.complete == whole.complete &&
      o.residue == whole.residue && o.hasHead == whole.hasHead && o.whyNot == whole.whyNot,
      "split changed the outcome", c.name, how, whole.describe(), o.describe());
  return true;
}

uint64_t nextRandom(uint64_t& state) {
  // A fixed LCG: the same "random" splits on every run, so a failure reproduces.
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return state >> 33;
}

size_t checkAllSplits(const Case& c) {
  // Runs the case under every split strategy and owner; returns how many runs it made.
  auto text = input(c);
  size_t runs = 0;
  for (Owner owner: {Owner::TAKE_ALL, Owner::TAKE_BYTE, Owner::DIRECT}) {
    auto whole = feedCase(c, nullptr, owner);
    ++runs;
    if (!checkAlone(c, whole, kj::str(owner, " whole"))) return runs;

    // Byte by byte.
    {
      kj::Vector<size_t> cuts;
      for (size_t i = 1; i < text.size(); i++) cuts.add(i);
      auto o = feedCase(c, cuts, owner);
      ++runs;
      auto how = kj::str(owner, " byte by byte");
      if (!checkAlone(c, o, how) || !checkSame(c, whole, o, how)) return runs;
    }

    // One cut at every position (every few positions for long inputs, but always around the
    // framer's initial 4096-byte buffer, where it compacts).
    size_t stride = text.size() <= 1024 ? 1 : 37;
    for (size_t i = 1; i < text.size(); i++) {
      if (i % stride != 0 && !(i >= 4090 && i <= 4100)) continue;
      size_t cut[] = {i};
      auto o = feedCase(c, cut, owner);
      ++runs;
      auto how = kj::str(owner, " cut at ", i);
      if (!checkAlone(c, o, how) || !checkSame(c, whole, o, how)) return runs;
    }

    // Pseudo-random cuts, 1 to 8 bytes apart or wider.
    uint64_t seed = 0x5eed ^ text.size();
    for (int round = 0; round < 20; round++) {
      kj::Vector<size_t> cuts;
      size_t at = 0;
      for (;;) {
        size_t gap = round % 2 == 0 ? 1 + nextRandom(seed) % 8 : 1 + nextRandom(seed) % 300;
        at += gap;
        if (at >= text.size()) break;
        cuts.add(at);
      }
      auto o = feedCase(c, cuts, owner);
      ++runs;
      auto how = kj::str(owner, " random round ", round);
      if (!checkAlone(c, o, how) || !checkSame(c, whole, o, how)) return runs;
    }
  }
  return runs;
}

ResponseFramer::Limits smallChunkLines() {
  ResponseFramer::Limits limits;
  limits.maxChunkLineBytes = 16;
  return limits;
}

ResponseFramer::Limits smallTrailers() {
  ResponseFramer::Limits limits;
  limits.maxTrailerBytes = 20;
  return limits;
}

ResponseFramer::Limits smallHeader() {
  ResponseFramer::Limits limits;
  limits.maxHeaderBytes = 64;
  return limits;
}

ResponseFramer::Limits fewInterim() {
  ResponseFramer::Limits limits;
  limits.maxInterimResponses = 2;
  return limits;
}

KJ_TEST("ResponseFramer frames well-formed responses the same whatever the split") {
  static const kj::String big = kj::str("HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n",
      kj::repeat('b', 10000));
  static const kj::String bigChunked = kj::str(
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n", kj::repeat('c', 5000),
      "\r\n10;ext\r\n0123456789abcdef\r\n0\r\n");
  static const kj::String bigChunkedPassed = kj::str(
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n", kj::repeat('c', 5000),
      "\r\n10\r\n0123456789abcdef\r\n0\r\n");
  Case cases[] = {
    {"content-length"_kj, BYTES("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
     Expect::COMPLETE, nullptr, BYTES("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")},
    {"content-length 0"_kj, BYTES("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
     Expect::COMPLETE, nullptr, BYTES("X")},
    {"chunked, extensions, trailers"_kj,
     BYTES("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=val\r\nhello\r\n"
           "A ; x=\"y\"\r\n0123456789\r\n0;last\r\nX-Trailer: 1\r\nX-Other: two\r\n\r\n"),
     Expect::COMPLETE, nullptr, BYTES("junk"), kj::HttpMethod::GET, false,
     strlen("X-Trailer: 1\r\nX-Other: two\r\n\r\n"), {},
     BYTES("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
           "A\r\n0123456789\r\n0\r\n")},
    {"chunked, bare LF"_kj,
     BYTES("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n"),
     Expect::COMPLETE, nullptr, nullptr, kj::HttpMethod::GET, false, 1},
    {"chunked, upper-case hex and leading zeros"_kj,
     BYTES("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n00A\r\n0123456789\r\n000\r\n\r\n"),
     Expect::COMPLETE, nullptr, nullptr, kj::HttpMethod::GET, false, 2, {},
     // Leading zeros are not passed on (kj-http refuses a long chunk-size line cut by a read).
     BYTES("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\nA\r\n0123456789\r\n0\r\n")},
    {"1xx before final"_kj, BYTES("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
     Expect::COMPLETE,
     BYTES("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n"
           "\r\nHTTP/1.1 102 Processing\n\n")},
    {"HEAD"_kj, BYTES("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"), Expect::COMPLETE,
     nullptr, BYTES("hello"), kj::HttpMethod::HEAD},
    {"204 with a Content-Length"_kj, BYTES("HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"),
     Expect::COMPLETE, nullptr, BYTES("0123456789")},
    {"304 chunked"_kj,
     BYTES("HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"), Expect::COMPLETE,
     nullptr, BYTES("0\r\n\r\n")},
    {"EOF-delimited"_kj, BYTES("HTTP/1.1 200 OK\r\n\r\nuntil the end"), Expect::COMPLETE,
     nullptr, nullptr, kj::HttpMethod::GET, true},
    {"EOF-delimited, still open"_kj, BYTES("HTTP/1.1 200 OK\r\n\r\nso far"), Expect::INCOMPLETE},
    {"empty Content-Length (kj-http takes it for none: EOF-delimited)"_kj,
     BYTES("HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\nso far"), Expect::INCOMPLETE},
    {"HTTP/1.0 keep-alive"_kj,
     BYTES("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc"),
     Expect::COMPLETE, nullptr, BYTES("more")},
    {"HTTP/1.0 until EOF"_kj, BYTES("HTTP/1.0 200 OK\r\n\r\nold"), Expect::COMPLETE, nullptr,
     nullptr, kj::HttpMethod::GET, true},
    {"lone CR ends a header line"_kj,
     BYTES("HTTP/1.1 200 OK\r\nX-A: 1\rContent-Length: 2\r\n\r\nok"), Expect::COMPLETE,
     nullptr, BYTES("NEXT")},
    {"obs-fold hides a Content-Length"_kj,
     BYTES("HTTP/1.1 200 OK\r\nX-A: 1\r\n Content-Length: 5\r\nContent-Length: 2\r\n\r\nok"),
     Expect::COMPLETE, nullptr, BYTES("xyz")},
    {"Transfer-Encoding and Content-Length"_kj,
     BYTES("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
           "3\r\nabc\r\n0\r\n\r\n"),
     Expect::COMPLETE, nullptr, nullptr, kj::HttpMethod::GET, false, 2},
    {"NUL byte in a header value"_kj,
     BYTES("HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 3\r\n\r\na\0c"), Expect::COMPLETE,
     nullptr, BYTES("\0")},
    {"101 then another protocol"_kj,
     BYTES("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nNEW PROTOCOL \r\n\r\n bytes"),
     Expect::INCOMPLETE},
    {"head exactly at its limit"_kj,
     BYTES("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: 01234567890123456\r\n\r\nok"),
     Expect::COMPLETE, nullptr, nullptr, kj::HttpMethod::GET, false, 0, smallHeader()},
    {"trailers exactly at their limit"_kj,
     BYTES("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
           "X-T: 1234567890123\r\n\r\n"),
     Expect::COMPLETE, nullptr, nullptr, kj::HttpMethod::GET, false,
     strlen("X-T: 1234567890123\r\n\r\n"), smallTrailers()},
    {"large Content-Length body"_kj, big.asArray(), Expect::COMPLETE, nullptr, BYTES("R")},
    {"large chunk"_kj, bigChunked.asArray(), Expect::INCOMPLETE, nullptr, nullptr,
     kj::HttpMethod::GET, false, 0, {}, bigChunkedPassed.asArray()},
  };
  // Sanity of the corpus itself: the head-limit case is exactly at the limit.
  KJ_ASSERT(strlen("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: 01234567890123456\r\n"
      "\r\n") == 64);
  size_t runs = 0;
  for (auto& c: cases) runs += checkAllSplits(c);
  KJ_LOG(INFO, "split runs", runs);
}

KJ_TEST("ResponseFramer rejects malformed responses the same whatever the split") {
  static const kj::String longChunkLine = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
      "\r\n\r\n5;", kj::repeat('x', 30), "\r\nhello\r\n0\r\n\r\n");
  static const kj::String longTrailer = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
      "\r\n\r\n0\r\nX-T: ", kj::repeat('t', 30), "\r\n\r\n");
  Case cases[] = {
    {"bad chunk size"_kj,
     BYTES("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
     Expect::FAIL},
    {"chunk size overflowing 64 bits"_kj,
     BYTES("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n"),
     Expect::FAIL},
    {"chunk size with trailing garbage"_kj,
     BYTES("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5xyz\r\nhello\r\n0\r\n\r\n"),
     Expect::FAIL},
    {"chunk data not followed by CRLF"_kj,
     BYTES("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n"),
     Expect::FAIL},
    {"chunk data followed by CR CR LF"_kj,
     BYTES("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\r\n0\r\n\r\n"),
     Expect::FAIL},
    {"negative Content-Length"_kj, BYTES("HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello"),
     Expect::FAIL},
    {"conflicting Content-Length lines"_kj,
     BYTES("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
     Expect::FAIL},
    {"conflicting Content-Length list"_kj,
     BYTES("HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!"), Expect::FAIL},
    {"identical Content-Length list (kj-http reads no list)"_kj,
     BYTES("HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"), Expect::FAIL},
    {"Content-Length with a plus sign"_kj,
     BYTES("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello"), Expect::FAIL},
    {"Content-Length too large"_kj,
     BYTES("HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nhello"),
     Expect::FAIL},
    {"header line without a colon"_kj,
     BYTES("HTTP/1.1 200 OK\r\nContent-Length 5\r\n\r\nhello"), Expect::FAIL},
    {"status code not a number"_kj, BYTES("HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n"),
     Expect::FAIL},
    {"HTTP/2 status line"_kj, BYTES("HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n"),
     Expect::FAIL},
    {"not HTTP at all"_kj, BYTES("ICY 200 OK\r\n\r\n"), Expect::FAIL},
    {"CRLF before the status line"_kj, BYTES("\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
     Expect::FAIL},
    {"four-digit status"_kj, BYTES("HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
     Expect::FAIL},
    {"head one byte over its limit"_kj,
     BYTES("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: 012345678901234567\r\n\r\nok"),
     Expect::FAIL, nullptr, nullptr, kj::HttpMethod::GET, false, 0, smallHeader()},
    {"too many interim responses"_kj, BYTES("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
     Expect::FAIL, BYTES("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
                         "HTTP/1.1 100 Continue\r\n\r\n"),
     nullptr, kj::HttpMethod::GET, false, 0, fewInterim()},
    {"truncated body at EOF"_kj, BYTES("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"),
     Expect::FAIL, nullptr, nullptr, kj::HttpMethod::GET, true},
    {"truncated chunked body at EOF"_kj,
     BYTES("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"),
     Expect::FAIL, nullptr, nullptr, kj::HttpMethod::GET, true},
    {"chunk-size line over its limit"_kj, longChunkLine.asArray(), Expect::FAIL, nullptr,
     nullptr, kj::HttpMethod::GET, false, 0, smallChunkLines()},
    {"trailer line over its limit"_kj, longTrailer.asArray(), Expect::FAIL, nullptr, nullptr,
     kj::HttpMethod::GET, false, 0, smallChunkLines()},
  };
  for (auto& c: cases) checkAllSplits(c);
}

KJ_TEST("ResponseFramer checks the CRLF after chunk data the same at its buffer's end") {
  // The framer's buffer starts at 4096 bytes and is compacted when full. Arrange for the CR after
  // a chunk's data to be the buffer's last byte: a second CR must be rejected there as anywhere.
  auto head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\ne00\r\n"_kj;
  size_t dataSize = 0xe00;
  size_t fill = 4096 - head.size() - 1;  // bytes of data and more before the CR
  KJ_ASSERT(fill > dataSize);
  // A second, padding chunk so that the first chunk's CR lands exactly at offset 4095.
  size_t pad = fill - dataSize - strlen("\r\n") - strlen("000\r\n");
  KJ_ASSERT(pad >= 0x100 && pad < 0x1000);  // three digits, none a leading zero (not passed on)
  const char* digits = "0123456789abcdef";
  char padLine[] = {digits[pad >> 8], digits[(pad >> 4) & 15], digits[pad & 15], 0};
  auto text = kj::str(head, kj::repeat('d', dataSize), "\r\n", padLine, "\r\n",
      kj::repeat('p', pad), "\r\r\n0\r\n\r\n");
  KJ_ASSERT(text[4095] == '\r' && text[4096] == '\r', text.size());
  Case c = {"CR CR LF at the buffer's end"_kj, text.asArray(), Expect::FAIL};

  // Read directly (as FramedStream does for large consumer buffers), the chunk data never enters
  // the buffer, so the CR lands elsewhere: the same bytes are then rejected, as they must be.
  size_t afterHead[] = {head.size()};
  KJ_EXPECT(feedCase(c, afterHead, Owner::DIRECT).failed);
  for (Owner owner: {Owner::TAKE_ALL, Owner::TAKE_BYTE}) {
    size_t cut[] = {4096};
    auto o = feedCase(c, cut, owner);
    checkAlone(c, o, kj::str(owner, " cut at 4096"));
    auto whole = feedCase(c, nullptr, owner);
    checkAlone(c, whole, kj::str(owner, " whole"));
  }
}

KJ_TEST("ResponseFramer honours a trailer limit larger than its header limit") {
  // Limits::maxTrailerBytes is a separate limit: trailers under it are accepted (or, if the
  // framer cannot hold them, refused with an error that names the trailers, not the head).
  ResponseFramer::Limits limits;
  limits.maxHeaderBytes = 4096;
  limits.maxTrailerBytes = 64 * 1024;
  kj::Vector<char> text;
  text.addAll("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"_kj);
  for (int i = 0; i < 30; i++) {
    text.addAll(kj::str("X-T", i, ": ", kj::repeat('t', 1000), "\r\n"));
  }
  text.addAll("\r\n"_kj);
  Case c = {"30 KB of trailers"_kj, text.asPtr(), Expect::COMPLETE, nullptr, nullptr,
      kj::HttpMethod::GET, false, text.size() - strlen("HTTP/1.1 200 OK\r\nTransfer-Encoding: "
      "chunked\r\n\r\n2\r\nok\r\n0\r\n"), limits};
  auto o = feedCase(c, nullptr, Owner::TAKE_ALL);
  KJ_EXPECT(!o.failed || strstr(o.failure.cStr(), "trailer") != nullptr, o.failure);
  checkAlone(c, o, "whole");
}

}  // namespace
}  // namespace sockfetch
