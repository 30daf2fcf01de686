// A fresh-eyes review of ResponseFramer's buffer management and of what it passes on to the
// kj-http 0.9.2 client that FramedStream puts over it, at the edges the other framer suites do not
// reach:
//  - a chunk-size line with many leading zeros (valid: chunk-size = 1*HEXDIG) is passed on
//    without them: kj-http 0.9.2 refuses a chunk-size line of more than 32 bytes that does not
//    arrive in one read of its buffer (MAX_CHUNK_HEADER_SIZE), so passed on whole it failed, or
//    not, depending on how large the head before it was and where reads were cut;
//  - a head far larger than the first buffer, cut at every position around each doubling of the
//    buffer (8, 16, 32 and 64 KiB; the split suite cuts around 4 KiB only), with body and residue
//    in the same read;
//  - interim (1xx) responses larger than the first buffer, one with a body-like Content-Length,
//    cut around the buffer's growth;
//  - a 101 with the new protocol's bytes in the same read;
//  - take() into an empty buffer, receivedDirect() exactly to the end of a body or a chunk, the CR
//    LF after chunk data split between reads;
//  - a residue after a complete response, finish(), start() refused, takeAll(), and a new exchange
//    framed on the reused buffer;
//  - a trailer line of blanks: a fold after a field, not a field before one, never the end;
//  - a close after an interim response, said as such.
//
// Everything is in-process (direct calls, or a StreamFetcher over a pipe); every wait is bounded.

#include "response-framer.h"
#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/vector.h>
#include <stdint.h>
#include <string.h>

namespace sockfetch {
namespace {

using Response = kj::HttpClient::Response;
using test::contains;

// =================================================================================================
// Helpers

struct Outcome {
  kj::String passed;  // everything take() returned
  bool complete = false;
  size_t residue = 0;
  kj::String failure;  // empty if none
  bool same(const Outcome& o) const {
    return passed == o.passed && complete == o.complete && residue == o.residue &&
        failure == o.failure;
  }
  kj::String describe() const {
    return kj::str("passed=", passed.size(), " complete=", complete, " residue=", residue,
        " failure=(", failure, ")");
  }
};

Outcome feedCuts(kj::StringPtr text, kj::ArrayPtr<const size_t> cuts,
    kj::HttpMethod method = kj::HttpMethod::GET) {
  // Feeds `text` to a fresh framer, one received() per piece between the (increasing) `cuts` as
  // far as space() allows, taking everything passable after each, as FramedStream does.
  ResponseFramer framer;
  framer.start(method);
  kj::Vector<char> passed;
  Outcome o;
  size_t pos = 0, cutIndex = 0;
  bool failed = false;
  auto takeAll = [&]() {
    kj::byte out[4096];
    while (size_t n = framer.take(kj::arrayPtr(out, sizeof(out)))) {
      passed.addAll(reinterpret_cast<char*>(out), reinterpret_cast<char*>(out) + n);
    }
  };
  while (pos < text.size() && !failed) {
    size_t pieceEnd = kj::min(cutIndex < cuts.size() ? cuts[cutIndex++] : text.size(),
        text.size());
    while (pos < pieceEnd && !failed) {
      kj::ArrayPtr<kj::byte> space;
      KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { space = framer.space(); })) {
        o.failure = kj::str(e.getDescription());
        failed = true;
        break;
      }
      size_t n = kj::min(space.size(), pieceEnd - pos);
      memcpy(space.begin(), text.begin() + pos, n);
      framer.received(n);
      pos += n;
      takeAll();
      KJ_IF_SOME(e, framer.getFailure()) {
        o.failure = kj::str(e.getDescription());
        failed = true;
      }
    }
  }
  o.passed = kj::heapString(passed.begin(), passed.size());
  o.complete = framer.isComplete();
  o.residue = framer.residueSize();
  return o;
}

void receive(ResponseFramer& framer, kj::StringPtr bytes) {
  // One received() of `bytes` (which must fit the framer's space()).
  auto space = framer.space();
  KJ_ASSERT(space.size() >= bytes.size());
  memcpy(space.begin(), bytes.begin(), bytes.size());
  framer.received(bytes.size());
}

kj::String takeAllText(ResponseFramer& framer) {
  kj::Vector<char> passed;
  kj::byte out[256];
  while (size_t n = framer.take(kj::arrayPtr(out, sizeof(out)))) {
    passed.addAll(reinterpret_cast<char*>(out), reinterpret_cast<char*>(out) + n);
  }
  return kj::heapString(passed.begin(), passed.size());
}

struct Env: public test::LoopEnv {
  // A StreamFetcher over an in-process pipe, and the scripted server end.
  kj::Own<StreamFetcher> fetcher;
  kj::Own<test::Peer> peer;

  explicit Env(ResponseFramer::Limits limits = ResponseFramer::Limits()) {
    auto transport = test::pipeTransport();
    StreamFetcher::Settings settings;
    settings.timer = timer;
    settings.limits = limits;
    fetcher = kj::heap<StreamFetcher>(kj::mv(transport.client), table, kj::mv(settings));
    peer = kj::heap<test::Peer>(ws, kj::mv(transport.server));
  }

  kj::String exchange(kj::StringPtr reply, size_t split = 0) {
    // A GET answered by `reply` (in two writes, the first `split` bytes long, if split > 0):
    // "STATUS body", or "failed: why".
    auto req = fetcher->request(kj::HttpMethod::GET, "/", headers());
    req.body = nullptr;
    peer->readRequest();
    kj::String first = kj::heapString(reply.slice(0, split));
    kj::String second = kj::heapString(reply.slice(split, reply.size()));
    kj::StringPtr secondPtr = second;
    auto sent = (split == 0 ? peer->sendLater(second) : peer->sendLater(first)
        .then([this, secondPtr]() { return peer->sendLater(secondPtr); }))
        .eagerlyEvaluate([](kj::Exception&&) {});
    return bounded(req.response.then([](Response&& r) {
      auto status = r.statusCode;
      return r.body->readAllText().attach(kj::mv(r.body)).then([status](kj::String body) {
        return kj::str(status, " ", body);
      });
    }).catch_([](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); }));
  }
};

kj::String chunkedHead(size_t total) {
  // A chunked response head of exactly `total` bytes.
  auto prefix = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Pad: "_kj;
  KJ_ASSERT(total > prefix.size() + 4);
  auto head = kj::str(prefix, kj::repeat('p', total - prefix.size() - 4), "\r\n\r\n");
  KJ_ASSERT(head.size() == total);
  return head;
}

// =================================================================================================
// Chunk-size lines kj-http 0.9.2 cannot read

KJ_TEST("a chunk size written with leading zeros is read whatever the head's size and the read "
    "boundaries") {
  // RFC 9112 7.1: chunk-size = 1*HEXDIG, so "000...05" (40 digits) is the size 5. The framer
  // passes the size on without its leading zeros (as it passes it on without extensions), so
  // kj-http 0.9.2, which refuses a chunk-size line over 32 bytes that straddles the end of its
  // header buffer, reads it wherever it lands: heads of 4060, 8156 and 16348 bytes put it there.
  auto body = kj::str(kj::repeat('0', 39), "5\r\nhello\r\n0\r\n\r\n");
  for (size_t headSize: {size_t(100), size_t(4060), size_t(4068), size_t(8156), size_t(8164),
           size_t(16348)}) {
    KJ_CONTEXT(headSize);
    Env env;
    auto outcome = env.exchange(kj::str(chunkedHead(headSize), body));
    KJ_EXPECT(outcome == "200 hello", outcome);
    KJ_EXPECT(!contains(outcome, "invalid HTTP chunk size"), outcome);
  }
  {
    // The same bytes in one write and in two are read alike (after a 3950-byte chunk, the
    // 40-digit line lands at kj's buffer end when kj's first read takes the head and the chunk
    // together).
    auto reply = kj::str(chunkedHead(100), "f6e\r\n", kj::repeat('x', 0xf6e), "\r\n",
        kj::repeat('0', 39), "5\r\nhello\r\n0\r\n\r\n");
    auto expected = kj::str("200 ", kj::repeat('x', 0xf6e), "hello");
    for (size_t split: {size_t(0), size_t(100), size_t(2000)}) {
      KJ_CONTEXT(split);
      Env env;
      auto outcome = env.exchange(reply, split);
      KJ_EXPECT(outcome == expected, outcome.slice(0, kj::min(outcome.size(), size_t(120))));
    }
  }
  for (size_t headSize: {size_t(4050), size_t(8146)}) {
    // The last-chunk line written as 40 zeros, straddling kj's buffer end the same way.
    KJ_CONTEXT("last chunk", headSize);
    Env env;
    auto outcome = env.exchange(kj::str(chunkedHead(headSize), "5\r\nhello\r\n",
        kj::repeat('0', 40), "\r\n\r\n"));
    KJ_EXPECT(outcome == "200 hello", outcome);
  }
  {
    // The same with a larger maxChunkLineBytes (256 KiB) and a line of 200000 digits, which the
    // framer accepts: the error is kj's assertion text, "expected bufferEnd - bufferStart <=
    // MAX_CHUNK_HEADER_SIZE [64 <= 32]; invalid HTTP chunk size".
    ResponseFramer::Limits limits;
    limits.maxChunkLineBytes = 256 * 1024;
    auto reply = kj::str(chunkedHead(100), kj::repeat('0', 200000), "5\r\nhello\r\n0\r\n\r\n");
    Env env(limits);
    auto outcome = env.exchange(reply);
    KJ_EXPECT(!contains(outcome, "MAX_CHUNK_HEADER_SIZE") &&
        !contains(outcome, "invalid HTTP chunk size"), outcome);
  }
}

KJ_TEST("a chunk-size line of 32 bytes or fewer after its extensions are stripped is read "
    "whatever the head's size") {
  // The contract the case above breaks only with leading zeros: a size of at most 16 hex digits,
  // with a long extension (stripped by the framer) and blanks, is read where the line straddles
  // kj-http's buffer end too.
  auto body = kj::str("000000000000005 ; name=\"", kj::repeat('x', 300), "\"\t\r\nhello\r\n"
      "0;end\r\n\r\n");
  for (size_t headSize: {size_t(100), size_t(4060), size_t(4064), size_t(8156), size_t(16348)}) {
    KJ_CONTEXT(headSize);
    Env env;
    auto outcome = env.exchange(kj::str(chunkedHead(headSize), body));
    KJ_EXPECT(outcome == "200 hello", outcome);
    KJ_EXPECT(env.fetcher->getState() == StreamFetcher::State::IDLE);
  }
}

// =================================================================================================
// Buffer growth and compaction

KJ_TEST("ResponseFramer frames a 60 KB head the same when cut at every byte around each doubling "
    "of its buffer") {
  // space() doubles the buffer (4, 8, 16, 32, 64 KiB) while a head grows; a cut just before or
  // after a doubling, or inside the final CR LF CR LF, must change nothing: same bytes passed,
  // same completeness, the same 3 bytes of residue after the body.
  auto text = kj::str("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Pad: ", kj::repeat('p', 60000),
      "\r\n\r\nhelloRES");
  size_t headEnd = text.size() - 8;
  auto whole = feedCuts(text, nullptr);
  KJ_EXPECT(whole.failure == "" && whole.complete && whole.residue == 3, whole.describe());
  KJ_EXPECT(whole.passed == text.slice(0, text.size() - 3));
  for (size_t boundary: {size_t(4096), size_t(8192), size_t(16384), size_t(32768), headEnd}) {
    for (size_t i = boundary - 6; i <= boundary + 6 && i < text.size(); i++) {
      size_t cut[] = {i};
      auto o = feedCuts(text, cut);
      KJ_EXPECT(o.same(whole), i, o.describe());
      size_t cuts[] = {i - 1, i, i + 1};  // one-byte reads across the boundary
      auto o3 = feedCuts(text, cuts);
      KJ_EXPECT(o3.same(whole), i, o3.describe());
    }
  }
}

KJ_TEST("ResponseFramer removes interim responses larger than its first buffer, one with a "
    "body-like Content-Length, however they are cut") {
  // A 1xx has no body (RFC 9112 6.3): its Content-Length frames nothing, so the final response's
  // status line follows its blank line. Interim responses are removed from the buffer in place
  // while the buffer grows and compacts around them.
  auto interim = [](kj::StringPtr status, size_t pad) {
    return kj::str("HTTP/1.1 ", status, "\r\nLink: </", kj::repeat('l', pad), ">\r\n\r\n");
  };
  auto finalResponse = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"_kj;
  auto text = kj::str(interim("103 Early Hints", 3000), interim("100 Continue", 5000),
      "HTTP/1.1 102 Processing\r\nContent-Length: 5\r\n\r\n", interim("103 Early Hints", 1000),
      finalResponse, "X");
  auto whole = feedCuts(text, nullptr);
  KJ_EXPECT(whole.passed == finalResponse && whole.complete && whole.residue == 1 &&
      whole.failure == "", whole.describe());
  for (size_t i = 1; i < text.size(); i += (i > 4080 && i < 4110) || (i > 8180 && i < 8200) ||
           i > text.size() - 60 ? 1 : 97) {
    size_t cut[] = {i};
    auto o = feedCuts(text, cut);
    KJ_EXPECT(o.same(whole), i, o.describe());
  }
}

// =================================================================================================
// Upgrades, direct reads, take()

KJ_TEST("ResponseFramer passes a 101 and the new protocol's bytes of the same read at once, and "
    "never completes") {
  ResponseFramer framer;
  framer.start(kj::HttpMethod::GET);
  auto head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
      "Connection: Upgrade\r\n\r\n"_kj;
  auto frame = "\x81\x05hello\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"_kj;  // (not a response)
  receive(framer, kj::str(head, frame));
  KJ_EXPECT(framer.getFailure() == nullptr);
  KJ_EXPECT(framer.isUpgrade());
  KJ_EXPECT(takeAllText(framer) == kj::str(head, frame));
  KJ_EXPECT(!framer.isComplete());
  KJ_EXPECT(framer.residueSize() == 0);
  KJ_EXPECT(framer.directReadLimit() == SIZE_MAX);
  KJ_EXPECT(framer.whyNotReusable() != nullptr);
  {
    // The end of the connection ends the new protocol, not a response: no failure.
    framer.receivedEof();
    KJ_EXPECT(framer.getFailure() == nullptr);
    KJ_EXPECT(!framer.isComplete());
  }
}

KJ_TEST("ResponseFramer: take() into an empty buffer consumes nothing; receivedDirect() exactly to "
    "the end of a body or a chunk") {
  {
    // Content-Length body read straight to its last byte: complete, nothing more may come direct,
    // and what arrives afterwards is residue.
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    receive(framer, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123"_kj);
    kj::byte none[1];
    KJ_EXPECT(framer.take(kj::arrayPtr(none, size_t(0))) == 0);
    KJ_EXPECT(framer.available() > 0);
    KJ_EXPECT(takeAllText(framer) == "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123");
    KJ_EXPECT(framer.take(kj::arrayPtr(none, size_t(0))) == 0);
    KJ_EXPECT(framer.directReadLimit() == 6);
    framer.receivedDirect(6);
    KJ_EXPECT(framer.isComplete());
    KJ_EXPECT(framer.directReadLimit() == 0);
    KJ_EXPECT(framer.residueSize() == 0);
    receive(framer, "XY"_kj);
    KJ_EXPECT(framer.available() == 0);
    KJ_EXPECT(framer.residueSize() == 2);
    framer.finish();
    KJ_EXPECT(framer.residueSize() == 2);
  }
  {
    // Chunk data read straight to its end; the CR and the LF after it arrive in two reads.
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    receive(framer, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n"_kj);
    takeAllText(framer);
    KJ_EXPECT(framer.directReadLimit() == 5);
    framer.receivedDirect(2);
    KJ_EXPECT(framer.directReadLimit() == 3);
    framer.receivedDirect(3);
    KJ_EXPECT(framer.directReadLimit() == 0);
    KJ_EXPECT(framer.endsWithBody() == false);
    receive(framer, "\r"_kj);
    KJ_EXPECT(takeAllText(framer) == "\r");
    receive(framer, "\n0\r\n"_kj);
    KJ_EXPECT(takeAllText(framer) == "\n0\r\n");
    KJ_EXPECT(!framer.isComplete() && !framer.mayGrow());
    receive(framer, "\r\n"_kj);
    KJ_EXPECT(framer.getFailure() == nullptr);
    KJ_EXPECT(framer.isComplete());
    KJ_EXPECT(framer.residueSize() == 0);
  }
}

// =================================================================================================
// Residue and the next exchange

KJ_TEST("ResponseFramer keeps a residue through finish(), refuses start() over it, and frames the "
    "next exchange from a clean start after takeAll()") {
  ResponseFramer framer;
  framer.start(kj::HttpMethod::HEAD);
  auto head = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"_kj;
  receive(framer, kj::str(head, "body!"));
  KJ_EXPECT(framer.isComplete() && framer.hasNoBody());
  KJ_EXPECT(takeAllText(framer) == head);
  KJ_EXPECT(framer.residueSize() == 5);
  framer.finish();
  KJ_EXPECT(framer.residueSize() == 5);
  KJ_EXPECT_THROW_MESSAGE("clean connection", framer.start(kj::HttpMethod::GET));
  auto rest = framer.takeAll();
  KJ_EXPECT(kj::str(rest.asChars()) == "body!");

  // The buffer (and the stale head position in it) is reused by the next exchange: a head that
  // lands over the old one is framed afresh, and nothing of the old head is reported.
  framer.start(kj::HttpMethod::GET, true);
  KJ_EXPECT(framer.findFieldKjRefuses() == nullptr);
  KJ_EXPECT(!framer.hasHead() && !framer.hasReceivedAny());
  receive(framer, "HTTP/1.1 204 No Content\r\n\r\n"_kj);
  KJ_EXPECT(framer.isComplete() && framer.hasNoBody());
  KJ_EXPECT(takeAllText(framer) == "HTTP/1.1 204 No Content\r\n\r\n");
  KJ_EXPECT(framer.residueSize() == 0);
  framer.finish();
  framer.freeBuffer();
  KJ_EXPECT(framer.bufferCapacity() == 0);
  framer.start(kj::HttpMethod::GET, true);
  receive(framer, "garbage\r\n"_kj);
  KJ_IF_SOME(e, framer.getFailure()) {
    KJ_EXPECT(contains(e.getDescription(), "carried earlier responses"), e.getDescription());
  } else {
    KJ_FAIL_EXPECT("garbage after earlier responses was not refused");
  }
}

KJ_TEST("a trailer line of blanks after a field continues it; before any field it is not a "
    "field; only an empty line ends the trailer section") {
  // RFC 9112 5.2: a line that begins with a blank continues the field before it (obsolete line
  // folding), also when it holds nothing else; the trailer section ends with an empty line. So
  // "X: 1", " ", "" is one field and the end, whatever the cuts, with nothing left over (taking
  // the blank line for the end would leave the real end as two bytes nobody asked for, and drop
  // the connection with a wrong reason).
  auto head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"_kj;
  for (auto trailers: {"X: 1\r\n \r\n\r\n"_kj, "X: 1\r\n\t \r\n\r\n"_kj, "X: 1\n  \n\n"_kj}) {
    KJ_CONTEXT(trailers);
    auto text = kj::str(head, trailers);
    for (size_t cut = 0; cut <= text.size(); cut++) {
      size_t cuts[] = {cut};
      auto o = feedCuts(text, cuts);
      KJ_EXPECT(o.complete && o.residue == 0 && o.failure.size() == 0, cut, o.describe());
    }
  }
  auto o = feedCuts(kj::str(head, " \r\n\r\n"), nullptr);
  KJ_EXPECT(!o.complete, o.describe());
  KJ_EXPECT(contains(o.failure, "a line in its trailer section that is not a field: a line of "
      "blanks"), o.describe());
}

KJ_TEST("a close after an interim response says the final response never came") {
  // The server sent `100 Continue` (or `103`) and closed: it did send something, so "without
  // sending a response" would be untrue; the failure says so, DISCONNECTED as any close.
  ResponseFramer framer;
  framer.start(kj::HttpMethod::POST);
  receive(framer, "HTTP/1.1 100 Continue\r\n\r\n");
  KJ_EXPECT(takeAllText(framer) == "");
  framer.receivedEof();
  auto& e = KJ_ASSERT_NONNULL(framer.getFailure());
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), "the server closed the connection after an interim "
      "(1xx) response, without sending the final one"), e);
}

}  // namespace
}  // namespace sockfetch
