#include "response-framer.h"

#include <sockfetch/kj-compat.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <string.h>

namespace sockfetch {
namespace {

struct Fed {
  kj::String passed;  // what take() returned
  bool complete;
  size_t residue;
};

Fed feed(ResponseFramer& framer, kj::ArrayPtr<const kj::StringPtr> segments) {
  // Feeds the segments one received() each, taking everything passable after each.
  kj::Vector<char> passed;
  for (auto segment: segments) {
    size_t pos = 0;
    while (pos < segment.size()) {
      auto space = framer.space();
      size_t n = kj::min(space.size(), segment.size() - pos);
      memcpy(space.begin(), segment.begin() + pos, n);
      framer.received(n);
      pos += n;
      KJ_IF_SOME(failure, framer.getFailure()) {
        kj::throwFatalException(kj::cp(failure));
      }
      char out[256];
      auto outBytes = kj::arrayPtr(reinterpret_cast<kj::byte*>(out), sizeof(out));
      while (size_t got = framer.take(outBytes)) {
        passed.addAll(out, out + got);
      }
    }
  }
  return Fed{kj::heapString(passed.begin(), passed.size()), framer.isComplete(),
      framer.residueSize()};
}

Fed feed(ResponseFramer& framer, std::initializer_list<kj::StringPtr> segments) {
  return feed(framer, kj::arrayPtr(segments.begin(), segments.size()));
}

KJ_TEST("ResponseFramer passes a Content-Length response and stops at its end") {
  ResponseFramer framer;
  framer.start(kj::HttpMethod::GET);
  auto fed = feed(framer, {"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloNEXT"_kj});
  KJ_EXPECT(fed.passed == "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", fed.passed);
  KJ_EXPECT(fed.complete);
  KJ_EXPECT(fed.residue == 4);
  KJ_EXPECT(framer.whyNotReusable() == nullptr);
}

KJ_TEST("ResponseFramer reads field names and tokens in any case, and only exact ones") {
  {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    auto fed = feed(framer, {"HTTP/1.1 200 OK\r\nCONTENT-length: 2\r\ncOnNeCtIoN: Keep-Alive, "
        "CLOSE\r\n\r\nokNEXT"_kj});
    KJ_EXPECT(fed.complete);
    KJ_EXPECT(fed.residue == 4);
    KJ_EXPECT(KJ_ASSERT_NONNULL(framer.whyNotReusable()) == "the server sent `Connection: close`");
  }
  {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    auto fed = feed(framer, {"HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: CHUNKED\r\n\r\n"
        "2\r\nok\r\n0\r\n\r\nNEXT"_kj});
    KJ_EXPECT(fed.complete);
    KJ_EXPECT(fed.residue == 4);
  }
  // Names one byte off (a space, an underscore, a letter, '-' moved) are other fields: without
  // framing, the body runs to the end of the connection.
  for (auto head: {"Content Length: 2"_kj, "Content_Length: 2"_kj, "Content-Lengti: 2"_kj,
                   "Contentl-ength: 2"_kj, "Transfer-Encodinh: chunked"_kj,
                   "Transfer_Encoding: chunked"_kj}) {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    auto fed = feed(framer, {kj::str("HTTP/1.1 200 OK\r\n", head, "\r\n\r\nok")});
    KJ_EXPECT(!fed.complete, head);
    KJ_EXPECT(KJ_ASSERT_NONNULL(framer.whyNotReusable()) ==
        "the response body was delimited by the server closing the connection", head);
  }
  {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    feed(framer, {"HTTP/1.1 200 OK\r\nConnection: clos, keep_alive, closed\r\n"
        "Content-Length: 0\r\n\r\n"_kj});
    KJ_EXPECT(framer.isComplete());
    KJ_EXPECT(framer.whyNotReusable() == nullptr);
  }
}

KJ_TEST("ResponseFramer withholds chunked trailers and completes at the final CRLF") {
  ResponseFramer framer;
  framer.start(kj::HttpMethod::GET);
  auto fed = feed(framer, {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"_kj,
      "3\r\nab"_kj, "c\r\n0\r\nX-T: 1\r\n"_kj});
  KJ_EXPECT(fed.passed.endsWith("\r\n\r\n3\r\nabc\r\n0\r\n"), fed.passed);
  KJ_EXPECT(!fed.complete);
  KJ_EXPECT(!framer.mayGrow());
  fed = feed(framer, {"\r\n"_kj});
  KJ_EXPECT(fed.passed == "");
  KJ_EXPECT(fed.complete);
  KJ_EXPECT(fed.residue == 0);
}

KJ_TEST("ResponseFramer parses a chunk-size line split across segments") {
  ResponseFramer framer;
  framer.start(kj::HttpMethod::GET);
  auto fed = feed(framer, {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1"_kj,
      "a\r\n"_kj, "0123456789abcdefghijklmnop\r\n0\r\n\r\n"_kj});
  KJ_EXPECT(fed.complete, fed.passed);
  KJ_EXPECT(fed.residue == 0);
}

KJ_TEST("ResponseFramer lets body data bypass it, and never past the end of the body") {
  ResponseFramer framer;
  framer.start(kj::HttpMethod::GET);
  feed(framer, {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nab"_kj});
  KJ_EXPECT(framer.directReadLimit() == 0x100 - 2);
  framer.receivedDirect(0x100 - 2);
  KJ_EXPECT(framer.directReadLimit() == 0);  // the CRLF after the chunk goes through the parser
  auto fed = feed(framer, {"\r\n0\r\n\r\n"_kj});
  KJ_EXPECT(fed.complete);

  ResponseFramer fixed;
  fixed.start(kj::HttpMethod::GET);
  feed(fixed, {"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n"_kj});
  KJ_EXPECT(fixed.directReadLimit() == 10000);
  fixed.receivedDirect(10000);
  KJ_EXPECT(fixed.isComplete());
  KJ_EXPECT(fixed.directReadLimit() == 0);
}

KJ_TEST("ResponseFramer removes interim responses") {
  ResponseFramer framer;
  framer.start(kj::HttpMethod::GET);
  auto fed = feed(framer, {"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early"_kj,
      " Hints\r\nLink: x\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"_kj});
  KJ_EXPECT(fed.passed == "HTTP/1.1 204 No Content\r\n\r\n", fed.passed);
  KJ_EXPECT(fed.complete);
}

KJ_TEST("ResponseFramer knows HEAD, 204 and 304 have no body") {
  ResponseFramer framer;
  framer.start(kj::HttpMethod::HEAD);
  KJ_EXPECT(feed(framer, {"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"_kj}).complete);
  framer.finish();
  framer.start(kj::HttpMethod::GET);
  KJ_EXPECT(feed(framer, {"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"_kj}).complete);
}

KJ_TEST("ResponseFramer knows when the end of a body is the end of the response") {
  // StreamFetcher relies on it: only a chunked body can end (for kj-http) before its response.
  ResponseFramer framer;
  framer.start(kj::HttpMethod::GET);
  KJ_EXPECT(!framer.endsWithBody());  // no head yet
  feed(framer, {"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab"_kj});
  KJ_EXPECT(framer.endsWithBody());
  feed(framer, {"c"_kj});
  KJ_EXPECT(framer.isComplete() && framer.endsWithBody());
  framer.finish();

  framer.start(kj::HttpMethod::GET);
  feed(framer, {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"_kj});
  KJ_EXPECT(!framer.endsWithBody());
  feed(framer, {"0\r\nX-Trailer: 1\r\n"_kj});
  KJ_EXPECT(!framer.endsWithBody());  // kj-http's body has ended; the response has not
  feed(framer, {"\r\n"_kj});
  KJ_EXPECT(framer.isComplete() && framer.endsWithBody());
  framer.finish();

  framer.start(kj::HttpMethod::GET);
  feed(framer, {"HTTP/1.1 200 OK\r\n\r\nuntil the end"_kj});
  KJ_EXPECT(framer.endsWithBody());
}

KJ_TEST("ResponseFramer explains why a response forbids reuse") {
  struct Case {
    kj::StringPtr response;
    kj::StringPtr reason;
  };
  Case cases[] = {
    {"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"_kj,
     "Connection: close"_kj},
    {"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"_kj, "HTTP/1.0"_kj},
    {"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 0\r\n\r\n"_kj,
     "Connection: close"_kj},
    {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"_kj,
     "both Transfer-Encoding and Content-Length"_kj},
    {"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"_kj, "upgraded"_kj},
  };
  for (auto& c: cases) {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    feed(framer, {c.response});
    auto why = KJ_ASSERT_NONNULL(framer.whyNotReusable(), c.response);
    KJ_EXPECT(strstr(why.cStr(), c.reason.cStr()) != nullptr, why, c.reason);
  }
  ResponseFramer keepAlive;
  keepAlive.start(kj::HttpMethod::GET);
  feed(keepAlive, {"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"_kj});
  KJ_EXPECT(keepAlive.whyNotReusable() == nullptr);
}

KJ_TEST("ResponseFramer rejects malformed framing with a clear error") {
  kj::StringPtr bad[] = {
    "HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\n"_kj,
    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"_kj,
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"_kj,
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXY"_kj,
    "HTTP/1.1 2000 OK\r\n\r\n"_kj,
  };
  for (auto text: bad) {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    KJ_EXPECT_THROW_MESSAGE("malformed HTTP response", feed(framer, {text}));
  }
}

KJ_TEST("ResponseFramer refuses an answer that is not HTTP/1.x from its first bytes, showing "
        "them") {
  // A server speaking another protocol may then wait for us: the framer does not wait for a head.
  struct Case {
    kj::StringPtr bytes;
    kj::StringPtr shown;
  };
  Case cases[] = {
    {"SSH-2.0-OpenSSH_9.2\r\n"_kj, "\"SSH-2.0-OpenSSH_9.2\""_kj},
    {"HTTP/2 200 OK\r\n\r\n"_kj, "\"HTTP/2 200 OK\""_kj},
    {"hTTP/1.1 200 OK\nContent-Length: 0\n\n"_kj, "\"hTTP/1.1 200 OK\""_kj},
    {"\r\nHTTP/1.1 200 OK\r\n\r\n"_kj, "an empty line"_kj},
    {"220 smtp.example ESMTP ready, and a long greeting\r\n"_kj,
     "\"220 smtp.example ESMTP ready, and a long\"..."_kj},
  };
  for (auto& c: cases) {
    // The same error whether the bytes come at once or one by one.
    for (bool byteByByte: {false, true}) {
      ResponseFramer framer;
      framer.start(kj::HttpMethod::GET);
      auto message = kj::str("is not HTTP/1.x (it began with ", c.shown, ")");
      if (byteByByte) {
        KJ_EXPECT_THROW_MESSAGE(message,
            for (char b: c.bytes) feed(framer, {kj::heapString(&b, 1)}));
      } else {
        KJ_EXPECT_THROW_MESSAGE(message, feed(framer, {c.bytes}));
      }
    }
  }
  {
    // A first line cut by the connection's end is shown as far as it came.
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    feed(framer, {"SSH-2"_kj});
    KJ_EXPECT(framer.getFailure() == nullptr);
    framer.receivedEof();
    auto& failure = KJ_ASSERT_NONNULL(framer.getFailure());
    KJ_EXPECT(strstr(failure.getDescription().cStr(), "(it began with \"SSH-2\")"), failure);
  }
  // Every prefix of a status line is accepted, byte by byte; so are blanks before it.
  for (auto text: {"HTTP/1.1 200 OK\r\n\r\n"_kj, "  \tHTTP/1.0 200 OK\r\n\r\n"_kj}) {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    for (char c: text) feed(framer, {kj::heapString(&c, 1)});
    KJ_EXPECT(framer.getFailure() == nullptr, text, KJ_ASSERT_NONNULL(framer.getFailure()));
    KJ_EXPECT(framer.hasHead(), text);
  }
}

KJ_TEST("ResponseFramer refuses repeated framing fields and codings kj-http cannot read") {
  // RFC 9110 lets a recipient accept Content-Length repeated with one value, but kj-http joins
  // the fields into a list it cannot read; it decodes `chunked` alone. The framer says so first.
  struct Case {
    kj::StringPtr head;
    kj::StringPtr message;
  };
  Case cases[] = {
    {"Content-Length: 2\r\nContent-Length: 2"_kj, "Content-Length sent more than once"_kj},
    {"Content-Length: 2, 2"_kj, "invalid Content-Length \"2, 2\""_kj},
    {"Content-Length: 1234567890123456789"_kj,
     "Content-Length \"1234567890123456789\" is too large"_kj},
    {"TRANSFER-ENCODING: gzip, CHUNKED"_kj, "Transfer-Encoding (\"gzip, CHUNKED\")"_kj},
    {"Transfer-Encoding: gzip"_kj, "Transfer-Encoding (\"gzip\")"_kj},
    {"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"_kj,
     "Transfer-Encoding (sent more than once)"_kj},
  };
  for (auto& c: cases) {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    KJ_EXPECT_THROW_MESSAGE(c.message, feed(framer,
        {kj::str("HTTP/1.1 200 OK\r\n", c.head, "\r\n\r\n2\r\nok\r\n0\r\n\r\n")}));
  }
  // Without a body, framing fields do not matter (kj-http reads none): nothing is refused.
  ResponseFramer framer;
  framer.start(kj::HttpMethod::HEAD);
  auto fed = feed(framer, {"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"_kj});
  KJ_EXPECT(fed.complete);
}

KJ_TEST("ResponseFramer limits the header block size") {
  ResponseFramer::Limits limits;
  limits.maxHeaderBytes = 1024;
  ResponseFramer framer(limits);
  framer.start(kj::HttpMethod::GET);
  auto big = kj::str("HTTP/1.1 200 OK\r\nX-Big: ", kj::repeat('a', 4000), "\r\n\r\n");
  KJ_EXPECT_THROW_MESSAGE("Limits::maxHeaderBytes (1024)",
      feed(framer, {big}));
}

KJ_TEST("ResponseFramer reports a truncated response at EOF") {
  ResponseFramer framer;
  framer.start(kj::HttpMethod::GET);
  feed(framer, {"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"_kj});
  framer.receivedEof();
  KJ_EXPECT(strstr(KJ_ASSERT_NONNULL(framer.getFailure()).getDescription().cStr(),
      "before the end of the response body") != nullptr);

  ResponseFramer eofBody;
  eofBody.start(kj::HttpMethod::GET);
  feed(eofBody, {"HTTP/1.1 200 OK\r\n\r\nall of it"_kj});
  eofBody.receivedEof();
  KJ_EXPECT(eofBody.isComplete());
  KJ_EXPECT(eofBody.whyNotReusable() != nullptr);
}

KJ_TEST("ResponseFramer reads header lines exactly as kj-http does") {
  // Whitespace before the colon is removed: the name still counts.
  {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    auto fed = feed(framer, {"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhelloNEXT"_kj});
    KJ_EXPECT(fed.complete);
    KJ_EXPECT(fed.residue == 4);
  }
  {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    auto fed = feed(framer, {"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding\t: chunked"
        "\r\n\r\n3\r\nabc\r\n0\r\n\r\n"_kj});
    KJ_EXPECT(fed.complete);
    KJ_EXPECT(fed.residue == 0);
    KJ_EXPECT(KJ_ASSERT_NONNULL(framer.whyNotReusable()) ==
        "the response had both Transfer-Encoding and Content-Length");
  }
  // A folded line belongs to the field before it: this Content-Length is part of X-A's value.
  {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    auto fed = feed(framer, {"HTTP/1.1 200 OK\r\nX-A: 1\r\n Content-Length: 5\r\n"
        "Connection: close\r\n\r\nhello"_kj});
    KJ_EXPECT(!fed.complete);  // delimited by the connection closing
    KJ_EXPECT(fed.passed.endsWith("hello"));
  }
  // A lone CR ends a line.
  {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    auto fed = feed(framer, {"HTTP/1.1 200 OK\r\nX-A: 1\rContent-Length: 2\r\n\r\nokNEXT"_kj});
    KJ_EXPECT(fed.complete);
    KJ_EXPECT(fed.residue == 4);
  }
  // A header line without a colon or a name is malformed, as it is for kj.
  {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    KJ_EXPECT_THROW_MESSAGE("without a colon",
        feed(framer, {"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n"_kj}));
  }
  {
    ResponseFramer framer;
    framer.start(kj::HttpMethod::GET);
    KJ_EXPECT_THROW_MESSAGE("without a name",
        feed(framer, {"HTTP/1.1 200 OK\r\nA: 1\r\n: 1\r\n\r\n"_kj}));
  }
}

KJ_TEST("ResponseFramer limits each trailer line, whatever the trailer section's limit") {
  ResponseFramer::Limits limits;
  limits.maxTrailerBytes = 1 << 20;
  ResponseFramer framer(limits);
  framer.start(kj::HttpMethod::GET);
  auto line = kj::heapString(limits.maxChunkLineBytes + 1);
  for (auto& c: line) c = 'x';
  auto head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: "_kj;
  KJ_EXPECT_THROW_MESSAGE("Limits::maxChunkLineBytes",
      feed(framer, {head, line.asPtr()}));
}

KJ_TEST("ResponseFramer accepts a bounded number of interim responses") {
  ResponseFramer::Limits limits;
  limits.maxInterimResponses = 3;
  {
    ResponseFramer framer(limits);
    framer.start(kj::HttpMethod::GET);
    auto fed = feed(framer, {"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n"
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"_kj});
    KJ_EXPECT(fed.complete);
    KJ_EXPECT(fed.passed == "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", fed.passed);
  }
  {
    ResponseFramer framer(limits);
    framer.start(kj::HttpMethod::GET);
    KJ_EXPECT_THROW_MESSAGE("Limits::maxInterimResponses (3)", feed(framer,
        {"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
         "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"_kj}));
  }
}

}  // namespace
}  // namespace sockfetch
