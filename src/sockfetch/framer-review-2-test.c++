// A second adversarial review of ResponseFramer's newest buffer handling (66f751f, bf07e73): the
// chunk-size rewrite whose gap is closed once per parse() (keepOnly()/closeGap()), trailer lines
// left dead between `limit` and `lineStart` until compact() drops them, and interim (1xx)
// responses skipped in place. The framer is driven directly, as FramedStream drives it, and
// compared with an independent reference model of what it must pass on and keep. Covered here
// and nowhere else:
//  - a seeded generator of thousands of responses: runs of interim responses (up to 500,
//    some larger than the first buffer), chunked bodies with dressed-up chunk-size lines and
//    trailer sections (folded lines, bare LF ends, sections larger than the buffer), Content-
//    Length and HEAD responses, followed by a second response's bytes or garbage; fed a byte at
//    a time, in random reads, in reads as large as space() offers, and with body data read
//    straight into the consumer's buffer (receivedDirect()), with take() of random sizes between
//    reads. After every read: what was passed on is a prefix of what must be, the response is
//    complete exactly when its last byte came and never before, residueSize() counts exactly the
//    bytes received past it; at the end finish(), residueSize(), takeAll() and start() of the next
//    response on the same framer (sometimes after freeBuffer());
//  - maxTrailerBytes, maxChunkLineBytes and maxInterimResponses set exactly to what a generated
//    response needs (accepted, however the reads fall) and one below it (refused, with only what
//    precedes the offending part passed on);
//  - a buffer boundary (compact(), growth) at every point of a run of interim responses and of a
//    trailer section, whatever the owner takes; the buffer does not grow for bytes nobody sees;
//  - a 101 after a run of interim responses skipped in place, at every read size;
//  - the smallest trailer sections at maxTrailerBytes 0 and 3, a CR of the empty line pending;
//  - defects: which limit a trailer line over both maxChunkLineBytes and maxTrailerBytes is
//    refused for depends on the reads; freeBuffer() between reads loses the CR seen after chunk
//    data, so a second CR is accepted there.
// Everything is in-process; no I/O.

#include "response-framer.h"
#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>
#include <kj/debug.h>
#include <kj/test.h>
#include <kj/vector.h>
#include <string.h>

namespace sockfetch {
namespace {

// =================================================================================================
// Reference model

struct Model {
  // One response as the server sends it, and what the framer must make of it.
  kj::Vector<char> input;       // the response's bytes (interim responses included)
  kj::Vector<char> passes;      // what must be passed on: final head, body framing rewritten
  kj::HttpMethod method = kj::HttpMethod::GET;
  size_t trailerBytes = 0;      // the trailer section's field lines, line ends included
  size_t longestLine = 0;       // longest chunk-size or trailer line, CR included, LF excluded
  unsigned interims = 0;
  bool hasChunkLines = false;
  bool hasTrailers = false;
  size_t passesBeforeTrailers = 0;  // passes.size() once the last-chunk line is passed on
  kj::Vector<size_t> lineLengths;   // per chunk-size/trailer line: its length (as longestLine)
  kj::Vector<size_t> passesBeforeLine;  // per such line: passes.size() before it
  kj::Vector<bool> lineIsTrailer;
};

void add(kj::Vector<char>& v, kj::StringPtr s) { v.addAll(s); }

void noteLine(Model& m, size_t length, bool trailer) {
  m.lineLengths.add(length);
  m.passesBeforeLine.add(m.passes.size());
  m.lineIsTrailer.add(trailer);
  m.longestLine = kj::max(m.longestLine, length);
}

void addInterim(test::Rng& rng, Model& m) {
  static const char* const CODES[] = {"100 Continue", "102 Processing", "103 Early Hints",
      "199 Whatever"};
  auto s = kj::str("HTTP/1.1 ", rng.pick(CODES), "\r\n");
  unsigned fields = rng.below(3);
  for (unsigned i = 0; i < fields; i++) {
    size_t len = rng.chance(3) ? 3000 + rng.below(6000) : rng.below(60);
    auto value = kj::heapString(len);
    for (auto& c: value) c = 'a' + rng.below(26);
    // A body-like Content-Length in an interim response frames nothing.
    s = kj::str(s, i == 0 && rng.chance(20) ? "Content-Length: 7" : "Link: <", value, ">\r\n");
  }
  s = kj::str(s, "\r\n");
  add(m.input, s);
  m.interims++;
}

void addChunkLine(test::Rng& rng, Model& m, size_t size) {
  static const char* const BLANKS[] = {"", "", "", " ", "\t", " \t "};
  static const char* const EXTS[] = {"", "", "", ";a=1", ";n=\"q;x\\\"y\"", " ; e",
      ";a;b=2;c=\"\"", ";longext=0123456789012345678901234567890123456789"};
  auto hex = kj::str(kj::hex(uint64_t(size)));
  if (rng.chance(50)) {
    for (auto& c: hex) if (c >= 'a' && c <= 'f') c = c - 'a' + 'A';
  }
  auto zeros = kj::heapString(rng.chance(25) ? rng.below(50) : 0);
  for (auto& c: zeros) c = '0';
  bool lf = rng.chance(15);
  auto content = kj::str(rng.pick(BLANKS), zeros, hex, rng.pick(BLANKS), rng.pick(EXTS),
      rng.pick(BLANKS));
  noteLine(m, content.size() + (lf ? 0 : 1), false);
  add(m.input, content);
  add(m.input, lf ? "\n" : "\r\n");
  add(m.passes, hex);
  add(m.passes, lf ? "\n" : "\r\n");
  m.hasChunkLines = true;
}

void addData(test::Rng& rng, Model& m, size_t size) {
  // Body bytes of every kind, line ends and status lines included: they frame nothing.
  static const char* const TRICKY[] = {"\r\n", "\r\n\r\n", "HTTP/1.1 100 Continue\r\n\r\n",
      "0\r\n\r\n", "\n", "\r"};
  kj::Vector<char> data;
  while (data.size() < size) {
    if (rng.chance(5)) {
      data.addAll(kj::StringPtr(rng.pick(TRICKY)));
    } else {
      data.add(char(rng.below(256)));
    }
  }
  data.resize(size);
  m.input.addAll(data);
  m.passes.addAll(data);
}

void addTrailers(test::Rng& rng, Model& m) {
  unsigned lines = rng.chance(20) ? 50 + rng.below(400) : rng.below(6);
  bool field = false;
  for (unsigned i = 0; i < lines; i++) {
    kj::String content;
    if (field && rng.chance(10)) {
      content = kj::str(rng.chance(50) ? " " : "\t", "folded ", i);  // a fold continues it
    } else {
      size_t len = rng.chance(5) ? 200 + rng.below(1500) : rng.below(40);
      auto value = kj::heapString(len);
      for (auto& c: value) c = 'A' + rng.below(26);
      content = kj::str("X-Trailer-", i, rng.chance(20) ? " : " : ": ", value);
      field = true;
    }
    bool lf = rng.chance(15);
    noteLine(m, content.size() + (lf ? 0 : 1), true);
    add(m.input, content);
    add(m.input, lf ? "\n" : "\r\n");
    m.trailerBytes += content.size() + (lf ? 1 : 2);
  }
  m.hasTrailers = lines > 0;
  add(m.input, rng.chance(15) ? "\n" : "\r\n");
}

Model generate(test::Rng& rng) {
  Model m;
  if (rng.chance(40)) {
    unsigned n = rng.chance(10) ? 100 + rng.below(400) : 1 + rng.below(4);
    for (unsigned i = 0; i < n; i++) addInterim(rng, m);
  }
  unsigned kind = rng.below(10);
  if (kind < 6) {
    auto head = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n",
        rng.chance(30) ? "X-Pad: ................................................\r\n" : "",
        "\r\n");
    add(m.input, head);
    add(m.passes, head);
    unsigned chunks = rng.chance(10) ? 50 + rng.below(200) : rng.below(6);
    for (unsigned i = 0; i < chunks; i++) {
      size_t size = rng.chance(10) ? 1000 + rng.below(9000) : 1 + rng.below(60);
      addChunkLine(rng, m, size);
      addData(rng, m, size);
      bool lf = rng.chance(15);
      add(m.input, lf ? "\n" : "\r\n");
      add(m.passes, lf ? "\n" : "\r\n");
    }
    addChunkLine(rng, m, 0);
    m.passesBeforeTrailers = m.passes.size();
    addTrailers(rng, m);
  } else if (kind < 9) {
    size_t size = rng.chance(20) ? 5000 + rng.below(20000) : rng.below(100);
    auto head = kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", size, "\r\n\r\n");
    add(m.input, head);
    add(m.passes, head);
    addData(rng, m, size);
  } else {
    m.method = kj::HttpMethod::HEAD;
    auto head = "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"_kj;
    add(m.input, head);
    add(m.passes, head);
  }
  return m;
}

kj::String residueFor(test::Rng& rng) {
  static const char* const RESIDUE[] = {"", "", "",
      "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
      "\r\n", "X", "0\r\n\r\n", "X-Late: trailer\r\n\r\n", " folded\r\n"};
  return kj::str(rng.pick(RESIDUE));
}

// =================================================================================================
// Driver

enum class Reads { WHOLE, BYTE, RANDOM, SPACE, DIRECT };
constexpr Reads ALL_READS[] = {Reads::WHOLE, Reads::BYTE, Reads::RANDOM, Reads::SPACE,
    Reads::DIRECT};

struct Outcome {
  kj::Vector<char> passed;
  bool complete = false;
  kj::Maybe<kj::String> failure;
  kj::String rest;  // takeAll() after finish()
  kj::Vector<kj::String> problems;  // invariant violations seen along the way
};

kj::StringPtr name(Reads r) {
  switch (r) {
    case Reads::WHOLE: return "whole";
    case Reads::BYTE: return "byte";
    case Reads::RANDOM: return "random";
    case Reads::SPACE: return "space";
    case Reads::DIRECT: return "direct";
  }
  return "?";
}

bool isPrefix(kj::ArrayPtr<const char> a, kj::ArrayPtr<const char> b) {
  return a.size() <= b.size() && (a.size() == 0 || memcmp(a.begin(), b.begin(), a.size()) == 0);
}

void takeSome(ResponseFramer& framer, test::Rng& rng, kj::Vector<char>& passed, bool all) {
  kj::byte out[700];
  for (;;) {
    size_t room = all || framer.available() > 3000 ? sizeof(out) : 1 + rng.below(sizeof(out));
    size_t n = framer.take(kj::arrayPtr(out, room));
    if (n == 0) break;
    passed.addAll(reinterpret_cast<char*>(out), reinterpret_cast<char*>(out) + n);
    if (!all && rng.chance(30)) break;
  }
}

Outcome feed(ResponseFramer& framer, const Model& m, kj::StringPtr residue, Reads reads,
    test::Rng& rng) {
  // Feeds the response and its residue; checks the invariants after every read.
  kj::Vector<char> input;
  input.addAll(m.input);
  input.addAll(residue);
  size_t responseLen = m.input.size();
  Outcome o;
  framer.start(m.method, rng.chance(50));
  auto problem = [&](kj::StringPtr what, size_t pos) {
    if (o.problems.size() < 5) o.problems.add(kj::str(what, " at ", pos));
  };
  size_t pos = 0;
  size_t checkedUpTo = 0;  // o.passed is known to be a prefix of m.passes this far
  while (pos < input.size()) {
    if (reads == Reads::DIRECT && framer.directReadLimit() > 0 && rng.chance(70)) {
      // Body data straight into the consumer's buffer, as FramedStream does.
      size_t n = kj::min(kj::min(framer.directReadLimit(), input.size() - pos),
          size_t(1 + rng.below(5000)));
      o.passed.addAll(input.begin() + pos, input.begin() + pos + n);
      framer.receivedDirect(n);
      pos += n;
    } else {
      auto space = framer.space();
      size_t want;
      switch (reads) {
        case Reads::WHOLE: want = input.size(); break;
        case Reads::BYTE: want = 1; break;
        case Reads::SPACE: want = space.size(); break;
        default: want = rng.chance(10) ? space.size() : 1 + rng.below(600); break;
      }
      size_t n = kj::min(kj::min(want, space.size()), input.size() - pos);
      memcpy(space.begin(), input.begin() + pos, n);
      framer.received(n);
      pos += n;
    }
    KJ_IF_SOME(e, framer.getFailure()) {
      o.failure = kj::str(e.getDescription());
      break;
    }
    // After each read: complete exactly when the response's last byte came.
    if (framer.isComplete() != (pos >= responseLen)) {
      problem(kj::str("isComplete() ", framer.isComplete(), " with ", pos, " of ", responseLen,
          " bytes received"), pos);
    }
    size_t wantResidue = pos > responseLen ? pos - responseLen : 0;
    if (framer.isComplete() && framer.residueSize() != wantResidue) {
      problem(kj::str("residueSize() ", framer.residueSize(), ", expected ", wantResidue), pos);
    }
    takeSome(framer, rng, o.passed, reads == Reads::WHOLE);
    if (o.passed.size() > m.passes.size() || (o.passed.size() > checkedUpTo &&
        memcmp(o.passed.begin() + checkedUpTo, m.passes.begin() + checkedUpTo,
            o.passed.size() - checkedUpTo) != 0)) {
      problem("passed on a byte that is not the response's", pos);
      break;
    }
    checkedUpTo = o.passed.size();
  }
  takeSome(framer, rng, o.passed, true);
  o.complete = framer.isComplete();
  if (o.complete) {
    if (framer.available() != 0) problem("available() after everything was taken", pos);
    if (framer.residueSize() != residue.size()) {
      problem(kj::str("residueSize() before finish() ", framer.residueSize(), ", expected ",
          residue.size()), pos);
    }
    framer.finish();
    if (framer.residueSize() != residue.size()) {
      problem(kj::str("residueSize() after finish() ", framer.residueSize(), ", expected ",
          residue.size()), pos);
    }
    auto rest = framer.takeAll();
    o.rest = kj::heapString(reinterpret_cast<const char*>(rest.begin()), rest.size());
  }
  return o;
}

ResponseFramer::Limits generous() {
  ResponseFramer::Limits limits;
  limits.maxTrailerBytes = 1 << 20;
  limits.maxChunkLineBytes = 4096;
  limits.maxInterimResponses = 1000;
  return limits;
}

// =================================================================================================
// Generated responses

KJ_TEST("framer: thousands of generated responses (interim runs, rewritten chunk lines, dead "
    "trailers, residue) in every kind of read, several on one framer: exactly what the model "
    "says") {
  // Contract (response-framer.h): of the bytes received the framer passes on only the final
  // head and the body framing (chunk-size lines reduced to their digits, no trailer), never a
  // byte past the response's end; it is complete exactly when the last byte of the response came
  // (never earlier, never later); residueSize() counts exactly the bytes received past it; after
  // finish() only the residue is buffered and takeAll() returns it, whole; start() of the next
  // response on the same framer (after takeAll(), sometimes after freeBuffer()) frames it afresh.
  // Here every case's limits leave room (each exact-limit edge is the next test's).
  size_t checked = 0;
  for (uint64_t seed = 1; seed <= 220; seed++) {
    for (auto reads: ALL_READS) {
      test::Rng rng(seed * 131 + unsigned(reads));
      ResponseFramer framer(generous());
      unsigned exchanges = 1 + rng.below(3);
      for (unsigned x = 0; x < exchanges; x++) {
        auto m = generate(rng);
        auto residue = residueFor(rng);
        auto o = feed(framer, m, residue, reads, rng);
        KJ_IF_SOME(f, o.failure) {
          KJ_FAIL_EXPECT("a well-formed response failed", seed, name(reads), x, f);
          break;
        }
        for (auto& p: o.problems) KJ_FAIL_EXPECT(p, seed, name(reads), x);
        KJ_EXPECT(o.complete, seed, name(reads), x);
        bool same = o.passed.size() == m.passes.size() && isPrefix(o.passed, m.passes);
        KJ_EXPECT(same, seed, name(reads), x, o.passed.size(), m.passes.size());
        KJ_EXPECT(o.rest == residue, seed, name(reads), x, o.rest, residue);
        if (!o.problems.empty() || !same || !o.complete || o.rest != residue) break;
        if (rng.chance(30)) framer.freeBuffer();
        ++checked;
      }
    }
  }
  KJ_EXPECT(checked >= 1000, checked);
}

KJ_TEST("framer: limits at their edges on generated responses (exactly at the limit accepted, one "
    "below refused with only what precedes the offending part passed on), every kind of read") {
  // Contract (Limits): maxTrailerBytes is the largest trailer section accepted (its field lines,
  // line ends included; the empty line that ends it is not trailer), maxChunkLineBytes the
  // longest chunk-size or trailer line (before its LF), maxInterimResponses the most interim
  // responses before the final one. A response exactly at a limit is read whole however the
  // reads fall; one over it fails, and nothing from the offending part on is passed on.
  size_t exact = 0, over = 0;
  for (uint64_t seed = 1; seed <= 500 && (exact < 600 || over < 600); seed++) {
    test::Rng gen(seed * 977);
    auto m = generate(gen);
    enum { TRAILERS, LINE, INTERIM } which;
    if (m.hasTrailers && gen.chance(40)) {
      which = TRAILERS;
    } else if (m.hasChunkLines && gen.chance(50)) {
      which = LINE;
    } else if (m.interims > 0) {
      which = INTERIM;
    } else {
      continue;
    }
    for (bool one: {false, true}) {
      auto limits = generous();
      size_t expectPassed = 0;
      switch (which) {
        case TRAILERS:
          limits.maxTrailerBytes = m.trailerBytes - one;
          expectPassed = m.passesBeforeTrailers;
          break;
        case LINE: {
          limits.maxChunkLineBytes = m.longestLine - one;
          if (one) {
            for (size_t i = 0; i < m.lineLengths.size(); i++) {
              if (m.lineLengths[i] == m.longestLine) {
                expectPassed = m.passesBeforeLine[i];
                break;
              }
            }
          }
          break;
        }
        case INTERIM:
          limits.maxInterimResponses = m.interims - one;
          expectPassed = 0;
          break;
      }
      for (auto reads: ALL_READS) {
        test::Rng rng(seed * 31 + unsigned(reads) + one);
        ResponseFramer framer(limits);
        auto residue = residueFor(rng);
        auto o = feed(framer, m, residue, reads, rng);
        if (!one) {
          KJ_IF_SOME(f, o.failure) {
            KJ_FAIL_EXPECT("a response exactly at a limit failed", seed, which, name(reads), f);
            continue;
          }
          for (auto& p: o.problems) KJ_FAIL_EXPECT(p, seed, which, name(reads));
          KJ_EXPECT(o.complete, seed, which, name(reads));
          KJ_EXPECT(o.passed.size() == m.passes.size() && isPrefix(o.passed, m.passes), seed,
              which, name(reads));
          KJ_EXPECT(o.rest == residue, seed, which, name(reads));
          ++exact;
        } else {
          KJ_EXPECT(o.failure != nullptr, "a response over a limit was accepted", seed, which,
              name(reads), limits.maxTrailerBytes, limits.maxChunkLineBytes,
              limits.maxInterimResponses);
          KJ_EXPECT(!o.complete, seed, which, name(reads));
          KJ_IF_SOME(f, o.failure) {
            KJ_EXPECT(strstr(f.cStr(), "over a limit") != nullptr, f);
          }
          // (The direct reader hands body bytes over itself, before the framer can look past.)
          KJ_EXPECT(o.passed.size() == expectPassed && isPrefix(o.passed, m.passes), seed, which,
              name(reads), o.passed.size(), expectPassed);
          ++over;
        }
      }
    }
  }
  KJ_EXPECT(exact >= 600 && over >= 600, exact, over);
}


// =================================================================================================
// Every buffer boundary in a run of interim responses and in a trailer section

Model sweepResponse(size_t interimPad, size_t dataSize) {
  // ~60 interim responses (~3 KiB), a chunked final response whose one chunk has `dataSize`
  // bytes, and ~80 trailer lines (~3.5 KiB, some folded, some with bare LF ends).
  Model m;
  for (unsigned i = 0; i < 60; i++) {
    auto pad = kj::heapString(i == 0 ? interimPad : 10 + i % 7);
    for (auto& c: pad) c = 'p';
    add(m.input, kj::str("HTTP/1.1 1", i % 2 ? "00 Continue" : "03 Early Hints", "\r\nLink: <",
        pad, ">\r\n\r\n"));
    m.interims++;
  }
  auto head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"_kj;
  add(m.input, head);
  add(m.passes, head);
  auto hex = kj::str(kj::hex(uint64_t(dataSize)));
  add(m.input, kj::str("000", hex, " ;ext=\"v\"\r\n"));
  add(m.passes, kj::str(hex, "\r\n"));
  for (size_t i = 0; i < dataSize; i++) {
    m.input.add('a' + i % 26);
    m.passes.add('a' + i % 26);
  }
  add(m.input, "\r\n0;last=1\r\n");
  add(m.passes, "\r\n0\r\n");
  m.passesBeforeTrailers = m.passes.size();
  for (unsigned i = 0; i < 80; i++) {
    auto line = i % 9 == 8 ? kj::str("\tfolded-", i, "\r\n")
        : kj::str("X-T-", i, ": value-", i, "-........................", i % 3 ? "\r\n" : "\n");
    m.trailerBytes += line.size();
    add(m.input, line);
  }
  add(m.input, "\r\n");
  m.hasTrailers = true;
  return m;
}

KJ_TEST("framer: a buffer boundary (compact(), growth) at every point of a run of interim "
    "responses and of a trailer section, reads as large as space(), any take() pattern") {
  // Contract (compact(), parseHeaderBlock(), parseTrailerLine()): interim responses skipped in
  // place and trailer lines left dead are dropped when room is needed, wherever the buffer's end
  // falls among them: the final response is passed on exactly, completes with its last byte, and
  // its residue is kept whole; an owner that takes everything after each read never makes the
  // buffer grow past its first size for bytes it will never see (dead trailers, skipped interim
  // responses), since every line here is far shorter than the buffer.
  auto residue = "HTTP/1.1 204 No Content\r\n\r\n"_kj;
  size_t cases = 0;
  for (size_t interimPad = 0; interimPad < 160; interimPad += 1) {
    for (size_t dataSize: {size_t(1), size_t(700), size_t(2300)}) {
      auto m = sweepResponse(interimPad, dataSize);
      for (unsigned policy = 0; policy < 3; policy++) {
        // 0: take everything after each read; 1: one byte per read; 2: nothing until the end.
        ResponseFramer framer;
        framer.start(kj::HttpMethod::GET);
        kj::Vector<char> input;
        input.addAll(m.input);
        input.addAll(residue);
        kj::Vector<char> passed;
        size_t pos = 0;
        size_t maxCapacity = 0;
        bool completeEarly = false;
        while (pos < input.size() && framer.getFailure() == nullptr) {
          auto space = framer.space();
          maxCapacity = kj::max(maxCapacity, framer.bufferCapacity());
          size_t n = kj::min(space.size(), input.size() - pos);
          memcpy(space.begin(), input.begin() + pos, n);
          framer.received(n);
          pos += n;
          if (framer.isComplete() != (pos >= m.input.size())) completeEarly = true;
          kj::byte out[4096];
          if (policy == 0) {
            for (;;) {
              size_t got = framer.take(out);
              if (got == 0) break;
              passed.addAll(reinterpret_cast<char*>(out), reinterpret_cast<char*>(out) + got);
            }
          } else if (policy == 1) {
            size_t got = framer.take(kj::arrayPtr(out, 1));
            passed.addAll(reinterpret_cast<char*>(out), reinterpret_cast<char*>(out) + got);
          }
        }
        KJ_IF_SOME(e, framer.getFailure()) {
          KJ_FAIL_EXPECT("failed", interimPad, dataSize, policy, e.getDescription());
          continue;
        }
        test::Rng unused(0);
        takeSome(framer, unused, passed, true);
        KJ_EXPECT(!completeEarly, "complete before (or not at) the response's last byte",
            interimPad, dataSize, policy);
        KJ_EXPECT(framer.isComplete(), interimPad, dataSize, policy);
        KJ_EXPECT(passed.size() == m.passes.size() && isPrefix(passed, m.passes), interimPad,
            dataSize, policy, passed.size(), m.passes.size());
        if (!framer.isComplete()) continue;
        KJ_EXPECT(framer.residueSize() == residue.size(), interimPad, dataSize, policy,
            framer.residueSize());
        framer.finish();
        auto rest = framer.takeAll();
        KJ_EXPECT(kj::heapString(reinterpret_cast<const char*>(rest.begin()), rest.size()) ==
            residue, interimPad, dataSize, policy);
        if (policy == 0) {
          KJ_EXPECT(maxCapacity == 4096, interimPad, dataSize, maxCapacity);
        }
        ++cases;
      }
    }
  }
  KJ_EXPECT(cases == 160 * 3 * 3, cases);
}


// =================================================================================================
// Targeted edges

struct Verdict {
  kj::String passed;
  bool complete = false;
  kj::String failure;  // "" if none
};

Verdict feedSplit(ResponseFramer::Limits limits, kj::StringPtr input, size_t readSize,
    kj::HttpMethod method = kj::HttpMethod::GET) {
  // Reads of `readSize` bytes (0: as large as space()), everything taken after each.
  ResponseFramer framer(limits);
  framer.start(method);
  kj::Vector<char> passed;
  size_t pos = 0;
  while (pos < input.size() && framer.getFailure() == nullptr) {
    auto space = framer.space();
    size_t n = kj::min(readSize == 0 ? space.size() : kj::min(readSize, space.size()),
        input.size() - pos);
    memcpy(space.begin(), input.begin() + pos, n);
    framer.received(n);
    pos += n;
    kj::byte out[1024];
    for (;;) {
      size_t got = framer.take(out);
      if (got == 0) break;
      passed.addAll(reinterpret_cast<char*>(out), reinterpret_cast<char*>(out) + got);
    }
  }
  Verdict v;
  v.passed = kj::heapString(passed.asPtr());
  v.complete = framer.isComplete();
  KJ_IF_SOME(e, framer.getFailure()) {
    v.failure = kj::str(e.getDescription());
  } else {
    v.failure = kj::str("");
  }
  return v;
}

KJ_TEST("a trailer line over both maxChunkLineBytes and maxTrailerBytes is refused for the same "
    "limit however the reads fall (the one its bytes crossed first)") {
  // Contract (response-framer-split-test, response-framer.h "Malformed framing ... is a FAILED
  // exception that says what was wrong"): the verdict, its message included, does not depend on
  // where the kernel cut the stream; the message names the setting to raise.
  // The same error however the trailer line arrives: the limit its bytes crossed first, as a
  // byte-at-a-time read finds it (else an upstream could steer, by timing its writes, which
  // limit the operator is told to raise).
  ResponseFramer::Limits limits;
  limits.maxChunkLineBytes = 20;
  limits.maxTrailerBytes = 10;
  auto input = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n",
      "X-Trailer: 0123456789abcdefghij\r\n\r\n");
  auto whole = feedSplit(limits, input, 0);
  KJ_EXPECT(whole.failure.size() > 0);
  KJ_EXPECT(whole.passed ==
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n");
  for (size_t readSize: {size_t(1), size_t(7), size_t(60)}) {
    auto split = feedSplit(limits, input, readSize);
    KJ_EXPECT(split.passed == whole.passed, readSize);
    KJ_EXPECT(split.failure == whole.failure, readSize, split.failure, whole.failure);
  }
}


KJ_TEST("framer: a 101 after a run of interim responses skipped in place, with the new protocol's "
    "bytes in the same reads: exactly the 101's head and all that follows, at every read size") {
  // Contract (isUpgrade(), parseHeaderBlock()): interim responses are never passed on; from the
  // end of a 101's head on every byte is the new protocol's and is passed on as it is, however
  // the interim responses were skipped (in place, then dropped by compact()) and however the
  // reads fall; the response never completes and nothing counts as residue.
  kj::Vector<char> input;
  for (unsigned i = 0; i < 40; i++) {
    input.addAll(kj::str("HTTP/1.1 100 Continue\r\nX-Pad: ", kj::repeat('q', i * 7), "\r\n\r\n"));
  }
  auto upgrade = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n"_kj;
  kj::Vector<char> expected;
  expected.addAll(upgrade);
  for (unsigned i = 0; i < 3000; i++) expected.add(char(i * 7 % 256));
  expected.addAll("HTTP/1.1 100 Continue\r\n\r\n0\r\n\r\n"_kj);  // the new protocol's bytes
  input.addAll(expected);
  auto text = kj::heapString(input.asPtr());
  for (size_t readSize = 0; readSize < 300; readSize += readSize < 20 ? 1 : 37) {
    auto v = feedSplit(ResponseFramer::Limits(), text, readSize);
    KJ_EXPECT(v.failure == "", readSize, v.failure);
    KJ_EXPECT(!v.complete, readSize);
    KJ_EXPECT(v.passed == kj::heapString(expected.asPtr()), readSize, v.passed.size());
  }
}


KJ_TEST("freeBuffer() while nothing is buffered, after the CR that follows chunk data was taken, "
    "changes nothing: a second CR there is still refused") {
  // Contract (freeBuffer(): it frees memory between responses and does nothing otherwise): the
  // verdict on a response does not depend on whether the owner called it between reads. Chunk
  // data must be followed by exactly CRLF (or LF): "abc\r\r\n" is malformed. With or without
  // freeBuffer() after the first CR was passed on and taken, the second CR fails the response
  // ("chunk data not followed by CRLF") and is not passed on. (FramedStream calls it only while
  // idle; within a response, positions carry what was seen, a CR after chunk data by where it
  // lies.)
  auto head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc"_kj;
  for (bool free: {false, true}) {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    kj::Vector<char> passed;
    auto feedBytes = [&](kj::StringPtr bytes) {
      auto space = framer.space();
      memcpy(space.begin(), bytes.begin(), bytes.size());
      framer.received(bytes.size());
      kj::byte out[256];
      size_t n;
      while ((n = framer.take(out)) > 0) {
        passed.addAll(reinterpret_cast<char*>(out), reinterpret_cast<char*>(out) + n);
      }
    };
    feedBytes(head);
    feedBytes("\r");
    KJ_EXPECT(framer.available() == 0);
    if (free) framer.freeBuffer();
    feedBytes("\r");
    KJ_EXPECT(framer.getFailure() != nullptr, free);
    feedBytes("\n0\r\n\r\n");
    KJ_EXPECT(!framer.isComplete(), free);
    KJ_EXPECT(kj::heapString(passed.asPtr()) == kj::str(head, "\r"), free, passed.asPtr());
  }
}


KJ_TEST("framer: the smallest trailer sections at maxTrailerBytes = 0 and at a 3-byte limit, every "
    "read size: an empty section is always accepted, a CR of the empty line never counted") {
  // Contract (Limits::maxTrailerBytes, parseTrailerLine()): the empty line that ends the trailer
  // section is not trailer; a line of "\r" not yet followed by its LF may be that empty line
  // and is not held against the limit; the field line "a:" + LF is 3 bytes.
  auto head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;x\r\nz\r\n0 ;y\r\n"_kj;
  auto passes = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n"_kj;
  struct Case { kj::StringPtr trailers; size_t limit; bool ok; };
  Case cases[] = {
    {"\r\n", 0, true}, {"\n", 0, true}, {"a:\n\r\n", 3, true}, {"a:\n\n", 3, true},
    {"a:\r\n\r\n", 3, false}, {"a:\n\r\n", 2, false}, {"\r\r\n", 0, false},
  };
  for (auto& c: cases) {
    for (size_t readSize = 0; readSize <= 12; readSize++) {
      ResponseFramer::Limits limits;
      limits.maxTrailerBytes = c.limit;
      auto v = feedSplit(limits, kj::str(head, c.trailers, "HTTP/1.1 204 No Content\r\n\r\n"),
          readSize);
      KJ_EXPECT(v.passed == passes, c.trailers, c.limit, readSize);
      KJ_EXPECT(v.complete == c.ok, c.trailers, c.limit, readSize, v.failure);
      KJ_EXPECT((v.failure == "") == c.ok, c.trailers, c.limit, readSize, v.failure);
    }
  }
}

}  // namespace
}  // namespace sockfetch
