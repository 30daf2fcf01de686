// Differential, seeded fuzzing of response framing: kj-http 0.9.2 (the per-exchange client) and
// ResponseFramer (the guard's own reading) each decide where a response ends. The safety property
// is that a connection is reused only if they agree exactly, so that no byte of one response (or
// of bytes an attacker appends to it) is ever read as part of the next response.
//
// A fixed-seed generator produces response heads and bodies from a grammar of tricky but
// plausible variations (Content-Length and Transfer-Encoding spellings, lists, duplicates, signs,
// leading zeros, huge values; whitespace before the colon, obsolete line folding, bare LF and lone
// CR line ends, empty names, lines without a colon, NUL and high bytes; HTTP/1.0, Connection
// variants, 1xx interim responses, HEAD/204/304 with a Content-Length, 101; chunk-size lines with
// extensions, upper-case hex, leading zeros, overflow, trailers, missing final CRLF; appended
// smuggled responses). Each case is written by a scripted peer (over an in-process pipe or a real
// loopback TCP connection, sometimes in two writes) to a real StreamFetcher, whose first response
// body is read to its end (or error). Then EITHER the fetcher is not reusable, OR it is IDLE and
// the next request's response is exactly the marker response (200, body "NEXT") that the peer
// sends only after reading that request. Cases the generator marks clean (one valid
// Content-Length or a valid chunked body, standard spelling) must be reused and their body must
// be exactly what an independent reference reading gives.
//
// Every wait is bounded: a case whose response is incomplete gets an end of stream from the peer
// once the event loop has nothing left to do, so nothing legitimately waits forever.

#include "response-framer.h"
#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/vector.h>
#include <ctype.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

namespace sockfetch {
namespace {

using State = StreamFetcher::State;

constexpr kj::StringPtr MARKER = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nNEXT"_kj;
constexpr kj::StringPtr SMUGGLED = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"_kj;

using test::Rng;

// =================================================================================================
// Cases

enum class Kind {
  CLEAN,    // unambiguous: must be reused, body exact
  BENIGN,   // unusual but with one clear meaning: if reused, the body must be that meaning
  HOSTILE,  // ambiguous or malformed: only the safety property applies
};

kj::StringPtr KJ_STRINGIFY(Kind k) {
  switch (k) {
    case Kind::CLEAN: return "clean";
    case Kind::BENIGN: return "benign";
    case Kind::HOSTILE: return "hostile";
  }
  KJ_UNREACHABLE;
}

struct Case {
  kj::Array<char> bytes;  // what the peer writes (may hold NUL and high bytes)
  kj::HttpMethod method = kj::HttpMethod::GET;
  Kind kind = Kind::CLEAN;
  bool mustClose = false;  // the response forbids reuse (Connection: close, HTTP/1.0, EOF body)
  bool exact = false;      // the first response must succeed with exactly `status` and `body`
  unsigned status = 200;
  kj::String body;         // the body a correct reader gives (CLEAN/BENIGN)
  size_t split = 0;        // nonzero: written in two writes, cut here
  bool tcp = false;
  kj::String what;         // the variations applied
};

kj::String escape(kj::ArrayPtr<const char> bytes, size_t max = 400) {
  kj::Vector<char> out;
  for (size_t i = 0; i < bytes.size() && i < max; i++) {
    unsigned char c = bytes[i];
    if (c == '\r') {
      out.addAll("\\r"_kj);
    } else if (c == '\n') {
      out.addAll("\\n"_kj);
    } else if (c == '\\') {
      out.addAll("\\\\"_kj);
    } else if (c < 0x20 || c >= 0x7f) {
      char buf[8];
      snprintf(buf, sizeof(buf), "\\x%02x", c);
      out.addAll(kj::StringPtr(buf));
    } else {
      out.add(c);
    }
  }
  if (bytes.size() > max) out.addAll(kj::str("...(", bytes.size(), " bytes)"));
  return kj::heapString(out.begin(), out.size());
}

kj::String hex(uint64_t n, bool upper) {
  char buf[32];
  snprintf(buf, sizeof(buf), upper ? "%llX" : "%llx", (unsigned long long)n);
  return kj::str(buf);
}

// Variations. Each has a kind: the case's kind is the strongest of those applied.
enum Mut : unsigned {
  M_CL_ZEROS, M_CL_OWS, M_NAME_CASE, M_SPACE_COLON, M_CL_DUP_SAME, M_CL_LIST_SAME,
  M_CL_DUP_DIFF, M_CL_SIGN, M_CL_HUGE, M_CL_SHORT, M_CL_LONG, M_TE_AND_CL, M_TE_LIST, M_TE_DUP,
  M_TE_WEIRD, M_FOLD_OTHER, M_FOLD_FRAMING, M_LONE_CR, M_MIXED_EOL, M_LF_EOL, M_EMPTY_NAME,
  M_NO_COLON, M_NUL_VALUE, M_HIGH_VALUE, M_HTTP10, M_CONN_CLOSE, M_CONN_KEEPALIVE, M_INTERIM,
  M_INTERIM_BODY, M_STATUS_WEIRD, M_LEADING_CRLF, M_NOBODY_WITH_BODY, M_SMUGGLE_TAIL, M_101,
  M_NO_FRAMING, M_CH_UPPER, M_CH_ZEROS, M_CH_EXT, M_CH_EXT_WS, M_CH_TRAILERS,
  M_CH_NO_FINAL_CRLF, M_CH_BAD_DATA_END, M_CH_WRONG_SIZE, M_CH_OVERFLOW, M_CH_BAD_SIZE,
  M_CH_LF_ONLY, M_CH_TRAILER_UNTERMINATED, M_CH_LONG_ZEROS, M_STATUS_NOREASON,
  M_COUNT
};

struct MutInfo {
  const char* name;
  Kind kind;
};

const MutInfo MUTS[M_COUNT] = {
  {"cl-leading-zeros", Kind::BENIGN}, {"cl-ows", Kind::BENIGN}, {"name-case", Kind::CLEAN},
  {"space-before-colon", Kind::BENIGN}, {"cl-dup-same", Kind::BENIGN},
  {"cl-list-same", Kind::BENIGN}, {"cl-dup-diff", Kind::HOSTILE}, {"cl-sign", Kind::HOSTILE},
  {"cl-huge", Kind::HOSTILE}, {"cl-short", Kind::HOSTILE}, {"cl-long", Kind::HOSTILE},
  {"te-and-cl", Kind::HOSTILE}, {"te-list", Kind::HOSTILE}, {"te-dup", Kind::HOSTILE},
  {"te-weird", Kind::HOSTILE}, {"fold-other", Kind::BENIGN}, {"fold-framing", Kind::HOSTILE},
  {"lone-cr", Kind::HOSTILE}, {"mixed-eol", Kind::BENIGN}, {"lf-eol", Kind::BENIGN},
  {"empty-name", Kind::HOSTILE}, {"no-colon", Kind::HOSTILE}, {"nul-value", Kind::HOSTILE},
  {"high-value", Kind::BENIGN}, {"http10", Kind::BENIGN}, {"conn-close", Kind::BENIGN},
  {"conn-keepalive", Kind::CLEAN}, {"interim", Kind::CLEAN}, {"interim-body", Kind::HOSTILE},
  {"status-weird", Kind::HOSTILE}, {"leading-crlf", Kind::HOSTILE},
  {"nobody-with-body", Kind::HOSTILE}, {"smuggle-tail", Kind::HOSTILE}, {"101", Kind::HOSTILE},
  {"no-framing", Kind::BENIGN}, {"ch-upper", Kind::CLEAN}, {"ch-zeros", Kind::BENIGN},
  {"ch-ext", Kind::CLEAN}, {"ch-ext-ws", Kind::BENIGN}, {"ch-trailers", Kind::CLEAN},
  {"ch-no-final-crlf", Kind::HOSTILE}, {"ch-bad-data-end", Kind::HOSTILE},
  {"ch-wrong-size", Kind::HOSTILE}, {"ch-overflow", Kind::HOSTILE},
  {"ch-bad-size", Kind::HOSTILE}, {"ch-lf-only", Kind::BENIGN},
  {"ch-trailer-unterminated", Kind::HOSTILE}, {"ch-long-zeros", Kind::HOSTILE},
  {"status-no-reason", Kind::BENIGN},
};

class Generator {
public:
  Generator(Rng& rng): rng(rng) {}

  Case generate() {
    for (auto& m: muts) m = false;
    Case c;
    unsigned count = rng.chance(40) ? 0 : rng.chance(60) ? 1 : 2 + rng.below(2);
    for (unsigned i = 0; i < count; i++) muts[rng.below(M_COUNT)] = true;

    // ---- shape
    c.method = rng.chance(12) ? kj::HttpMethod::HEAD : kj::HttpMethod::GET;
    static const unsigned STATUSES[] = {200, 200, 200, 201, 203, 299, 404, 500};
    unsigned status = rng.pick(STATUSES);
    bool noBodyStatus = false;
    if (rng.chance(7)) {
      static const unsigned NOBODY[] = {204, 304};
      status = rng.pick(NOBODY);
      noBodyStatus = true;
    }
    bool is101 = has(M_101);
    if (is101) status = 101;
    enum Framing { CL, CHUNKED, NONE } framing = rng.chance(50) ? CL : CHUNKED;
    if (has(M_NO_FRAMING)) framing = NONE;
    if (framing != CHUNKED) clearChunkMuts();
    if (framing != CL) {
      for (auto m: {M_CL_ZEROS, M_CL_OWS, M_CL_DUP_SAME, M_CL_LIST_SAME, M_CL_DUP_DIFF,
                    M_CL_SIGN, M_CL_HUGE, M_CL_SHORT, M_CL_LONG}) {
        muts[m] = false;
      }
    }
    if (framing != CHUNKED) {
      muts[M_TE_LIST] = muts[M_TE_DUP] = muts[M_TE_WEIRD] = muts[M_TE_AND_CL] = false;
    }

    static const size_t SIZES[] = {0, 1, 2, 5, 10, 16, 31, 64, 255, 300, 3000, 9000};
    auto payload = makePayload(rng.pick(SIZES));
    if ((has(M_CL_SHORT) || has(M_CL_LONG) || has(M_CH_WRONG_SIZE)) && payload.size() == 0) {
      payload = makePayload(7);
    }
    bool bodiless = c.method == kj::HttpMethod::HEAD || noBodyStatus || is101;

    // ---- line ends
    eol = has(M_LF_EOL) ? "\n"_kj : "\r\n"_kj;

    kj::Vector<char> out;
    // interim responses
    if (has(M_LEADING_CRLF)) out.addAll("\r\n"_kj);
    if (has(M_INTERIM)) {
      unsigned n = 1 + rng.below(3);
      for (unsigned i = 0; i < n; i++) {
        static const kj::StringPtr INTERIM[] = {
          "HTTP/1.1 100 Continue"_kj, "HTTP/1.1 102 Processing"_kj,
          "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload"_kj,
          "HTTP/1.1 100 Continue\r\nContent-Length: 5"_kj,
          "HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\nConnection: close"_kj,
        };
        out.addAll(rng.pick(INTERIM));
        out.addAll("\r\n\r\n"_kj);
      }
    }
    if (has(M_INTERIM_BODY)) {
      out.addAll("HTTP/1.1 100 Continue\r\nContent-Length: 3\r\n\r\nabc"_kj);
    }

    // status line
    kj::StringPtr version = has(M_HTTP10) ? "HTTP/1.0"_kj : "HTTP/1.1"_kj;
    kj::String statusLine = kj::str(version, " ", status, " ", reason(status));
    if (has(M_STATUS_NOREASON)) statusLine = kj::str(version, " ", status);
    if (has(M_STATUS_WEIRD)) {
      static const char* const WEIRD[] = {
        "HTTP/1.1  %u OK", "HTTP/1.10 %u OK", "HTTP/2 %u OK", " HTTP/1.1 %u OK",
        "HTTP/1.1 %u0 OK", "http/1.1 %u OK", "HTTP/1.1 %uOK", "HTTP/1.1\t%u OK",
        "HTTP/1.1 0%u OK", "HTTP/1.1 %u\tOK", "HTTP/1.2 %u OK", "HTTP/1.1 %u OK\x7f",
      };
      char buf[64];
      snprintf(buf, sizeof(buf), rng.pick(WEIRD), status);
      statusLine = kj::str(buf);
    }
    line(out, statusLine);

    // headers
    bool connClose = false, keepAlive = false;
    auto extra = [&]() {
      static const kj::StringPtr EXTRA[] = {
        "Server: fuzz"_kj, "Date: Tue, 01 Jan 2030 00:00:00 GMT"_kj, "X-Pad: abcdefgh"_kj,
        "Cache-Control: no-cache"_kj, "Content-Type: text/plain"_kj, "Vary: Accept-Encoding"_kj,
        "Contents: not-a-length"_kj, "Content-Lengthy: 99"_kj, "X-Content-Length: 77"_kj,
        "Transfer-Encodings: chunked"_kj, "Connections: close"_kj,
      };
      line(out, rng.pick(EXTRA));
    };
    unsigned extras = rng.below(4);
    for (unsigned i = 0; i < extras; i++) extra();
    if (has(M_FOLD_OTHER)) {
      out.addAll("X-Folded: first"_kj);
      out.addAll(eol);
      out.addAll(rng.chance(50) ? " second"_kj : "\tsecond"_kj);
      out.addAll(eol);
    }
    if (has(M_HIGH_VALUE)) line(out, "X-High: caf\xc3\xa9 \xff\xfe\x80"_kj);
    if (has(M_NUL_VALUE)) {
      static const char NUL_LINE[] = "X-Nul: a\0b";
      line(out, kj::arrayPtr(NUL_LINE, sizeof(NUL_LINE) - 1));
    }
    if (has(M_EMPTY_NAME)) line(out, rng.chance(50) ? ": empty-name"_kj : " : empty-name"_kj);
    if (has(M_NO_COLON)) {
      static const kj::StringPtr NOCOLON[] = {
        "Content-Length 5"_kj, "garbage"_kj, "Transfer-Encoding chunked"_kj, "X-A"_kj,
      };
      line(out, rng.pick(NOCOLON));
    }
    if (has(M_CONN_CLOSE)) {
      static const kj::StringPtr CLOSE[] = {
        "Connection: close"_kj, "Connection: Close"_kj, "Connection: keep-alive, close"_kj,
        "connection: CLOSE"_kj, "Connection: foo,close"_kj, "Connection:close"_kj,
      };
      line(out, rng.pick(CLOSE));
      connClose = true;
    }
    if (has(M_CONN_KEEPALIVE)) {
      static const kj::StringPtr KEEP[] = {
        "Connection: keep-alive"_kj, "Connection: Keep-Alive"_kj, "connection: foo, keep-alive"_kj,
      };
      line(out, rng.pick(KEEP));
      keepAlive = true;
    }
    if (is101) {
      line(out, "Upgrade: fuzz"_kj);
      line(out, "Connection: Upgrade"_kj);
    }

    // framing
    kj::Vector<char> bodyBytes;
    uint64_t announced = payload.size();
    bool nobodyWithBody = has(M_NOBODY_WITH_BODY);
    if (nobodyWithBody && !bodiless) {
      // Not bodiless by method or status: use a fixed bodiless response that sends a body anyway.
      return rebuildAsNoBody(c);
    }
    if (framing == CL) {
      if (has(M_CL_SHORT)) announced = payload.size() - 1 - rng.below(payload.size());
      if (has(M_CL_LONG)) announced = payload.size() + 1 + rng.below(5);
      kj::String value = kj::str(announced);
      if (has(M_CL_ZEROS)) value = kj::str(kj::repeat('0', 1 + rng.below(4)), value);
      if (has(M_CL_OWS)) {
        static const kj::StringPtr OWS[] = {" "_kj, "\t"_kj, "  "_kj};
        value = kj::str(rng.pick(OWS), value, rng.pick(OWS));
      }
      if (has(M_CL_LIST_SAME)) value = kj::str(value, rng.chance(50) ? ", " : ",", value);
      if (has(M_CL_SIGN)) {
        static const char* const SIGN[] = {"+%s", "-%s", "0x%s", "%s.0", "", "%s abc", "%s;",
                                           "%se0", "%s,", ",%s", "\"%s\""};
        char buf[64];
        snprintf(buf, sizeof(buf), rng.pick(SIGN), value.cStr());
        value = kj::str(buf);
      }
      if (has(M_CL_HUGE)) {
        static const kj::StringPtr HUGE_[] = {
          "18446744073709551616"_kj, "99999999999999999999"_kj, "18446744073709551615"_kj,
          "9223372036854775808"_kj, "1000000000000000000"_kj, "999999999999999999"_kj,
          "000000000000000000000000005"_kj,
        };
        value = kj::str(rng.pick(HUGE_));
      }
      kj::StringPtr name = "Content-Length";
      if (has(M_NAME_CASE)) {
        static const kj::StringPtr NAMES[] = {
          "content-length"_kj, "CONTENT-LENGTH"_kj, "Content-length"_kj, "cOnTeNt-LeNgTh"_kj,
        };
        name = rng.pick(NAMES);
      }
      auto colon = framingField(out, name, value);
      if (has(M_CL_DUP_SAME)) line(out, kj::str(name, colon, value));
      if (has(M_CL_DUP_DIFF)) {
        if (rng.chance(50)) {
          line(out, kj::str(name, colon, announced + 1 + rng.below(3)));
        } else {
          line(out, kj::str(name, colon, announced == 0 ? 1 : announced - 1));
        }
      }
      if (!bodiless || nobodyWithBody) bodyBytes.addAll(payload);
    } else if (framing == CHUNKED) {
      kj::StringPtr name = "Transfer-Encoding";
      kj::String value = kj::str("chunked");
      if (has(M_NAME_CASE)) {
        static const kj::StringPtr NAMES[] = {
          "transfer-encoding"_kj, "TRANSFER-ENCODING"_kj, "Transfer-encoding"_kj,
        };
        static const kj::StringPtr VALUES[] = {"Chunked"_kj, "CHUNKED"_kj, "chunked"_kj};
        name = rng.pick(NAMES);
        value = kj::str(rng.pick(VALUES));
      }
      if (has(M_TE_LIST)) {
        static const kj::StringPtr LISTS[] = {
          "gzip, chunked"_kj, "chunked, identity"_kj, "identity, chunked"_kj,
          "chunked, chunked"_kj, "chunked,"_kj, ", chunked"_kj, "deflate,chunked"_kj,
        };
        value = kj::str(rng.pick(LISTS));
      }
      if (has(M_TE_WEIRD)) {
        static const kj::StringPtr WEIRD[] = {
          "xchunked"_kj, "chunked;q=1"_kj, "chunk"_kj, "\"chunked\""_kj, "chunked\x0b"_kj,
          "ch unked"_kj, "identity"_kj, "gzip"_kj, "chunked chunked"_kj,
        };
        value = kj::str(rng.pick(WEIRD));
      }
      auto colon = framingField(out, name, value);
      if (has(M_TE_DUP)) {
        static const kj::StringPtr SECOND[] = {"chunked"_kj, "gzip"_kj, "identity"_kj};
        line(out, kj::str(name, colon, rng.pick(SECOND)));
      }
      if (!bodiless) encodeChunked(bodyBytes, payload);
      if (has(M_TE_AND_CL)) {
        uint64_t cl = rng.chance(50) ? bodyBytes.size() : payload.size();
        line(out, kj::str("Content-Length: ", cl));
      }
    } else if (!bodiless) {
      bodyBytes.addAll(payload);  // delimited by the end of the stream
    }
    unsigned extrasAfter = extras == 0 ? rng.below(2) : 0;
    for (unsigned i = 0; i < extrasAfter; i++) extra();

    // end of head
    out.addAll(has(M_MIXED_EOL) && rng.chance(50) ? "\n"_kj : eol);
    out.addAll(bodyBytes);
    if (has(M_SMUGGLE_TAIL)) out.addAll(SMUGGLED);

    // expectations
    c.bytes = kj::heapArray<char>(out.begin(), out.size());
    c.status = status;
    c.body = bodiless ? kj::str() : kj::str(payload);
    c.kind = Kind::CLEAN;
    kj::Vector<kj::String> names;
    for (unsigned m = 0; m < M_COUNT; m++) {
      if (!muts[m]) continue;
      names.add(kj::str(MUTS[m].name));
      if (MUTS[m].kind > c.kind) c.kind = MUTS[m].kind;
    }
    if (framing == CHUNKED && !names.size()) names.add(kj::str("chunked"));
    c.mustClose = connClose || (has(M_HTTP10) && !keepAlive) || (framing == NONE && !bodiless) ||
        is101;
    if (is101) c.kind = Kind::HOSTILE;
    // Exact when nothing but reuse-forbidding (or clean) variations were applied.
    c.exact = c.kind == Kind::CLEAN ||
        (c.kind == Kind::BENIGN && onlyAmong({M_CONN_CLOSE, M_HTTP10, M_NO_FRAMING,
            M_NAME_CASE, M_CONN_KEEPALIVE, M_INTERIM, M_CH_UPPER, M_CH_EXT, M_CH_TRAILERS,
            M_STATUS_NOREASON}));
    if (c.mustClose && c.kind == Kind::CLEAN) c.kind = Kind::BENIGN;
    c.what = kj::strArray(names, ",");
    if (c.what.size() == 0) c.what = kj::str(framing == CL ? "content-length" : "chunked");
    return c;
  }

private:
  Rng& rng;
  bool muts[M_COUNT];
  kj::StringPtr eol = "\r\n";

  bool has(Mut m) const { return muts[m]; }

  bool onlyAmong(std::initializer_list<Mut> allowed) const {
    for (unsigned m = 0; m < M_COUNT; m++) {
      if (!muts[m]) continue;
      bool ok = false;
      for (auto a: allowed) ok = ok || a == m;
      if (!ok) return false;
    }
    return true;
  }

  void clearChunkMuts() {
    for (auto m: {M_CH_UPPER, M_CH_ZEROS, M_CH_EXT, M_CH_EXT_WS, M_CH_TRAILERS,
                  M_CH_NO_FINAL_CRLF, M_CH_BAD_DATA_END, M_CH_WRONG_SIZE, M_CH_OVERFLOW,
                  M_CH_BAD_SIZE, M_CH_LF_ONLY, M_CH_TRAILER_UNTERMINATED, M_CH_LONG_ZEROS}) {
      muts[m] = false;
    }
  }

  static kj::StringPtr reason(unsigned status) {
    switch (status) {
      case 101: return "Switching Protocols";
      case 200: return "OK";
      case 201: return "Created";
      case 203: return "Non-Authoritative Information";
      case 204: return "No Content";
      case 304: return "Not Modified";
      case 404: return "Not Found";
      case 500: return "Internal Server Error";
      default: return "Whatever";
    }
  }

  kj::String makePayload(size_t n) {
    kj::Vector<char> p;
    while (p.size() < n) {
      if (rng.chance(3)) {
        // Text that looks like framing, to punish a reader that looks inside bodies.
        static const kj::StringPtr LOOKS[] = {
          "\r\n0\r\n\r\n"_kj, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"_kj,
          "\r\n\r\n"_kj, "\n"_kj, "5\r\nhello\r\n"_kj,
        };
        p.addAll(rng.pick(LOOKS));
      } else {
        p.add('a' + rng.below(26));
      }
    }
    return kj::heapString(p.begin(), n);
  }

  kj::StringPtr lineEnd() {
    if (has(M_LONE_CR) && rng.chance(40)) return "\r";
    if (has(M_MIXED_EOL)) return rng.chance(50) ? "\r\n"_kj : "\n"_kj;
    return eol;
  }

  void line(kj::Vector<char>& out, kj::ArrayPtr<const char> text) {
    out.addAll(text);
    out.addAll(lineEnd());
  }

  kj::StringPtr framingField(kj::Vector<char>& out, kj::StringPtr name, kj::StringPtr value) {
    // Writes a framing field, with whitespace before its colon or folded if the case says so;
    // returns the separator used, for duplicates of the field.
    kj::StringPtr colon = ": ";
    if (has(M_SPACE_COLON)) {
      static const kj::StringPtr COLONS[] = {" : "_kj, "\t: "_kj, "  :"_kj};
      colon = rng.pick(COLONS);
    }
    if (has(M_FOLD_FRAMING)) {
      if (rng.chance(50)) {
        // the value on a continuation line
        line(out, kj::str(name, ":"));
        line(out, kj::str(" ", value));
      } else {
        // the whole field on a continuation line of another field
        line(out, "X-Before: a"_kj);
        line(out, kj::str(" ", name, colon, value));
      }
    } else {
      line(out, kj::str(name, colon, value));
    }
    return colon;
  }

  kj::String sizeText(uint64_t n) {
    bool upper = has(M_CH_UPPER) ? true : false;
    auto digits = hex(n, upper);
    if (has(M_CH_ZEROS) && rng.chance(60)) {
      digits = kj::str(kj::repeat('0', 1 + rng.below(5)), digits);
    }
    if (has(M_CH_LONG_ZEROS) && rng.chance(60)) digits = kj::str(kj::repeat('0', 40), digits);
    if (has(M_CH_OVERFLOW) && rng.chance(60)) {
      // 2^64 + n: wraps to n in 64-bit arithmetic.
      char buf[32];
      snprintf(buf, sizeof(buf), "1%016llx", (unsigned long long)n);
      digits = kj::str(buf);
    }
    return digits;
  }

  kj::String extension() {
    if (has(M_CH_EXT) && rng.chance(60)) {
      static const kj::StringPtr EXT[] = {";a=b"_kj, ";name"_kj, ";q=\"x;y\""_kj, ";a=1;b=2"_kj};
      return kj::str(rng.pick(EXT));
    }
    if (has(M_CH_EXT_WS) && rng.chance(60)) {
      static const kj::StringPtr EXT[] = {" ;a=b"_kj, "\t;x"_kj, " "_kj, "  ; y = z"_kj};
      return kj::str(rng.pick(EXT));
    }
    return kj::str();
  }

  kj::StringPtr chunkEol() {
    if (has(M_CH_LF_ONLY) && rng.chance(60)) return "\n";
    return "\r\n";
  }

  void encodeChunked(kj::Vector<char>& out, kj::StringPtr payload) {
    // Pieces of random sizes, then the last chunk, trailers and the final CRLF.
    size_t pos = 0;
    bool wrongDone = !has(M_CH_WRONG_SIZE);
    bool badSizeDone = !has(M_CH_BAD_SIZE);
    bool badEndDone = !has(M_CH_BAD_DATA_END);
    while (pos < payload.size()) {
      size_t n = kj::min(payload.size() - pos, size_t(1 + rng.below(rng.chance(30) ? 5000 : 40)));
      uint64_t announced = n;
      if (!wrongDone && rng.chance(50)) {
        announced = rng.chance(50) ? n + 1 : n - 1;
        wrongDone = true;
      }
      kj::String size = sizeText(announced);
      if (!badSizeDone && rng.chance(50)) {
        static const char* const BAD[] = {"-%s", "0x%s", " ", "%sg", "", "+%s", "%s\r", "\r%s"};
        char buf[80];
        snprintf(buf, sizeof(buf), rng.pick(BAD), size.cStr());
        size = kj::str(buf);
        badSizeDone = true;
      }
      out.addAll(size);
      out.addAll(extension());
      out.addAll(chunkEol());
      out.addAll(payload.slice(pos, pos + n));
      if (!badEndDone && rng.chance(50)) {
        static const kj::StringPtr BADEND[] = {
            "X\r\n"_kj, "\r\r\n"_kj, ""_kj, "\n\n"_kj, " \r\n"_kj};
        out.addAll(rng.pick(BADEND));
        badEndDone = true;
      } else {
        out.addAll(chunkEol());
      }
      pos += n;
    }
    kj::String last = sizeText(0);
    if (!wrongDone) last = kj::str("1");  // a last chunk that is not one
    if (!badSizeDone) last = kj::str("-0");
    out.addAll(last);
    out.addAll(extension());
    out.addAll(chunkEol());
    if (has(M_CH_TRAILERS) || has(M_CH_TRAILER_UNTERMINATED)) {
      unsigned n = 1 + rng.below(3);
      for (unsigned i = 0; i < n; i++) {
        static const kj::StringPtr TRAILERS[] = {
          "X-Trailer: t"_kj, "Expires: never"_kj, "Content-Length: 99"_kj,
          "X-Checksum: 0123456789abcdef"_kj,
        };
        out.addAll(rng.pick(TRAILERS));
        out.addAll(chunkEol());
      }
    }
    if (!has(M_CH_NO_FINAL_CRLF) && !has(M_CH_TRAILER_UNTERMINATED)) out.addAll(chunkEol());
  }

  Case rebuildAsNoBody(Case& c) {
    // A bodiless response (204, 304, or to HEAD) whose Content-Length bytes are sent anyway:
    // those bytes are not part of the response.
    static const kj::StringPtr HEADS[] = {
      "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"_kj,
      "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"_kj,
      "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n"_kj,
    };
    auto head = rng.pick(HEADS);
    bool chunked = head.endsWith("chunked\r\n\r\n");
    c.bytes = kj::heapArray<char>(
        kj::str(head, chunked ? "5\r\nhello\r\n0\r\n\r\n" : "hello").asArray());
    c.status = head.startsWith("HTTP/1.1 204") ? 204 : 304;
    c.body = kj::str();
    c.kind = Kind::HOSTILE;
    c.what = kj::str("nobody-with-body");
    return kj::mv(c);
  }
};

// =================================================================================================
// An independent, strict reference reading of clean responses: skips interim responses, reads
// one Content-Length or a chunked body. Returns null for anything it does not understand.

struct Reference {
  unsigned status;
  kj::String body;
  size_t end;  // where the response ends
};

kj::Maybe<Reference> referenceRead(kj::ArrayPtr<const char> in, kj::HttpMethod method) {
  size_t pos = 0;
  auto readLine = [&](kj::String& lineOut) -> bool {
    for (size_t i = pos; i < in.size(); i++) {
      if (in[i] == '\n') {
        size_t e = i;
        if (e > pos && in[e - 1] == '\r') e--;
        lineOut = kj::heapString(in.begin() + pos, e - pos);
        pos = i + 1;
        return true;
      }
    }
    return false;
  };
  for (;;) {
    kj::String statusLine;
    if (!readLine(statusLine)) return nullptr;
    if (statusLine.size() < 12 ||
        !(statusLine.startsWith("HTTP/1.1 ") || statusLine.startsWith("HTTP/1.0 "))) {
      return nullptr;
    }
    unsigned status = 0;
    for (size_t i = 9; i < 12; i++) {
      if (statusLine[i] < '0' || statusLine[i] > '9') return nullptr;
      status = status * 10 + (statusLine[i] - '0');
    }
    kj::Maybe<uint64_t> length;
    bool chunked = false;
    for (;;) {
      kj::String h;
      if (!readLine(h)) return nullptr;
      if (h.size() == 0) break;
      const char* colon = strchr(h.cStr(), ':');
      if (colon == nullptr || colon == h.cStr()) return nullptr;
      kj::String name = kj::heapString(h.cStr(), colon - h.cStr());
      for (auto& ch: name) ch = tolower(ch);
      const char* v = colon + 1;
      while (*v == ' ') v++;
      kj::String value = kj::heapString(v);
      for (auto& ch: value) ch = tolower(ch);
      if (name == "content-length") {
        if (length != nullptr || value.size() == 0) return nullptr;
        uint64_t n = 0;
        for (char ch: value) {
          if (ch < '0' || ch > '9') return nullptr;
          n = n * 10 + (ch - '0');
        }
        length = n;
      } else if (name == "transfer-encoding") {
        if (chunked || value != "chunked") return nullptr;
        chunked = true;
      } else if (name.startsWith(" ") || name.endsWith(" ")) {
        return nullptr;
      }
    }
    if (status >= 100 && status < 200) {
      if (status == 101) return nullptr;
      continue;  // interim
    }
    if (method == kj::HttpMethod::HEAD || status == 204 || status == 304) {
      return Reference{status, kj::str(), pos};
    }
    if (chunked && length != nullptr) return nullptr;
    KJ_IF_SOME(n, length) {
      if (in.size() - pos < n) return nullptr;
      auto body = kj::heapString(in.begin() + pos, n);
      return Reference{status, kj::mv(body), pos + n};
    }
    if (!chunked) return nullptr;
    kj::Vector<char> body;
    for (;;) {
      kj::String sizeLine;
      if (!readLine(sizeLine)) return nullptr;
      uint64_t n = 0;
      size_t i = 0;
      for (; i < sizeLine.size(); i++) {
        char ch = tolower(sizeLine[i]);
        if (ch >= '0' && ch <= '9') {
          n = n * 16 + (ch - '0');
        } else if (ch >= 'a' && ch <= 'f') {
          n = n * 16 + (ch - 'a' + 10);
        } else {
          break;
        }
        if (i > 15) return nullptr;
      }
      if (i == 0 || (i < sizeLine.size() && sizeLine[i] != ';')) return nullptr;
      if (n == 0) break;
      if (in.size() - pos < n + 2) return nullptr;
      body.addAll(in.begin() + pos, in.begin() + pos + n);
      pos += n;
      if (in[pos] != '\r' || in[pos + 1] != '\n') return nullptr;
      pos += 2;
    }
    for (;;) {
      kj::String trailer;
      if (!readLine(trailer)) return nullptr;
      if (trailer.size() == 0) break;
    }
    return Reference{status, kj::heapString(body.begin(), body.size()), pos};
  }
}

// =================================================================================================
// The framer's own reading of a response, standalone (it is a pure parser): the body its framing
// gives, to compare with the body kj-http gave the caller. Null if it does not read a complete
// response without residue.

kj::Maybe<kj::String> framerBody(kj::ArrayPtr<const char> in, kj::HttpMethod method) {
  ResponseFramer framer;
  framer.start(method);
  kj::Vector<char> passed;
  auto drain = [&]() {
    char buf[4096];
    for (;;) {
      size_t n = framer.take(kj::arrayPtr(reinterpret_cast<kj::byte*>(buf), sizeof(buf)));
      if (n == 0) break;
      passed.addAll(buf, buf + n);
    }
  };
  size_t pos = 0;
  // A byte at a time until the head is parsed: then what was passed on is exactly the head, and
  // the state says how the body is framed.
  while (pos < in.size() && !framer.hasHead() && framer.getFailure() == nullptr) {
    auto space = framer.space();
    space[0] = in[pos++];
    framer.received(1);
  }
  if (!framer.hasHead() || framer.getFailure() != nullptr) return nullptr;
  bool chunked = !framer.endsWithBody();
  drain();
  size_t headEnd = passed.size();
  while (pos < in.size() && framer.getFailure() == nullptr) {
    auto space = framer.space();
    size_t n = kj::min(space.size(), in.size() - pos);
    memcpy(space.begin(), in.begin() + pos, n);
    pos += n;
    framer.received(n);
    drain();
  }
  drain();
  if (framer.getFailure() != nullptr || !framer.isComplete() || framer.residueSize() != 0) {
    return nullptr;
  }
  kj::ArrayPtr<const char> rest = passed.asPtr().slice(headEnd, passed.size());
  if (framer.hasNoBody()) return kj::str();
  if (!chunked) return kj::heapString(rest.begin(), rest.size());
  // What the framer passes of a chunked body: size lines reduced to their hex digits, data, line
  // ends (CRLF or LF), up to the end of the last-chunk line.
  kj::Vector<char> body;
  size_t i = 0;
  for (;;) {
    uint64_t size = 0;
    size_t start = i;
    while (i < rest.size() && isxdigit((unsigned char)rest[i])) {
      char ch = tolower(rest[i++]);
      size = size * 16 + (ch <= '9' ? ch - '0' : ch - 'a' + 10);
    }
    if (i == start) return nullptr;
    if (i < rest.size() && rest[i] == '\r') i++;
    if (i >= rest.size() || rest[i] != '\n') return nullptr;
    i++;
    if (size == 0) break;
    if (rest.size() - i < size) return nullptr;
    body.addAll(rest.begin() + i, rest.begin() + i + size);
    i += size;
    if (i < rest.size() && rest[i] == '\r') i++;
    if (i >= rest.size() || rest[i] != '\n') return nullptr;
    i++;
  }
  if (i != rest.size()) return nullptr;
  return kj::heapString(body.begin(), body.size());
}

// =================================================================================================
// Running a case

struct Env: public test::LoopEnv {
  Env() { limit = 3 * kj::SECONDS; }
};


struct First {
  kj::Maybe<kj::Exception> error;
  unsigned status = 0;
  kj::String body;
};

kj::Promise<First> readResponse(kj::Promise<kj::HttpClient::Response> response) {
  return response.then([](kj::HttpClient::Response&& r) {
    unsigned status = r.statusCode;
    auto& body = *r.body;
    return body.readAllText().attach(kj::mv(r.body)).then([status](kj::String&& text) {
      First f;
      f.status = status;
      f.body = kj::mv(text);
      return f;
    });
  }).catch_([](kj::Exception&& e) {
    First f;
    f.error = kj::mv(e);
    return f;
  });
}

void turns(Env& env, unsigned n) {
  for (unsigned i = 0; i < n; i++) kj::evalLater([]() {}).wait(env.ws);
}

enum class Next { NOT_TRIED, REFUSED, FAILED, MARKER, OTHER };

struct Outcome {
  First first;
  bool eofSent = false;
  State after = State::IDLE;
  kj::String closeReason;
  Next next = Next::NOT_TRIED;
  kj::String nextDesc;
};

Outcome runCase(Env& env, const Case& c) {
  auto transport = c.tcp ? test::tcpTransport(env.io) : test::pipeTransport();
  kj::Own<kj::AsyncIoStream> server = kj::mv(transport.server);
  if (c.tcp) {
    int fd = KJ_ASSERT_NONNULL(server->getFd());
    int one = 1;
    KJ_SYSCALL(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)));
  }
  StreamFetcher::Settings settings;
  settings.timer = env.timer;
  auto fetcher = kj::heap<StreamFetcher>(kj::mv(transport.client), env.table, kj::mv(settings));

  Outcome outcome;
  auto req = fetcher->request(c.method, "/first", env.headers());
  req.body = nullptr;
  kj::Vector<char> requestBytes;
  env.bounded(test::readHeadInto(*server, requestBytes));

  bool sendDone = false;
  auto bytes = c.bytes.asPtr().asBytes();
  kj::Promise<void> sending = nullptr;
  if (c.split == 0 || c.split >= bytes.size()) {
    sending = writeAll(*server, bytes);
  } else {
    auto second = bytes.slice(c.split, bytes.size());
    auto& s = *server;
    sending = writeAll(s, bytes.slice(0, c.split)).then([&s, second]() {
      return writeAll(s, second);
    });
  }
  sending = sending.then([&sendDone]() { sendDone = true; }, [](kj::Exception&&) {})
      .eagerlyEvaluate(nullptr);

  auto first = readResponse(kj::mv(req.response));
  bool ready = first.poll(env.ws);
  if (!ready && c.tcp) {
    env.timer.afterDelay(2 * kj::MILLISECONDS).wait(env.ws);
    ready = first.poll(env.ws);
  }
  if (!ready) {
    // The response is incomplete as far as someone is concerned: end the stream, so that nothing
    // legitimately waits forever.
    outcome.eofSent = true;
    sending = nullptr;
    server->shutdownWrite();
  }
  outcome.first = env.bounded(kj::mv(first));

  // Let the idle watch (or the exchange's close) see whatever is left.
  turns(env, 4);
  kj::Promise<void>(kj::NEVER_DONE).poll(env.ws);  // and polls the OS for what arrived
  turns(env, 4);

  outcome.after = fetcher->getState();
  KJ_IF_SOME(r, fetcher->getCloseReason()) outcome.closeReason = kj::str(r);

  if (outcome.after == State::IDLE) {
    KJ_ASSERT(sendDone || outcome.eofSent,
        "the fetcher is IDLE while the peer's response bytes were not all read");
    sending = nullptr;
    kj::Maybe<kj::HttpClient::Request> req2;
    KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
      req2 = fetcher->request(kj::HttpMethod::GET, "/next", env.headers());
    })) {
      outcome.next = Next::REFUSED;
      outcome.nextDesc = kj::str(e.getDescription());
      return outcome;
    }
    auto& r2 = KJ_ASSERT_NONNULL(req2);
    r2.body = nullptr;
    kj::Vector<char> buf2;
    auto& s = *server;
    auto serve = test::readHeadInto(s, buf2).then([&s]() {
      return writeAll(s, MARKER.asBytes());
    }).eagerlyEvaluate([](kj::Exception&&) {});
    auto second = env.bounded(readResponse(kj::mv(r2.response)));
    KJ_IF_SOME(e, second.error) {
      outcome.next = Next::FAILED;
      outcome.nextDesc = kj::str(e.getDescription());
    } else if (second.status == 200 && second.body == "NEXT") {
      outcome.next = Next::MARKER;
      auto head = kj::heapString(buf2.begin(), buf2.size());
      if (!head.startsWith("GET /next ")) {
        outcome.next = Next::OTHER;
        outcome.nextDesc = kj::str("the marker came, but the peer read: ", escape(head));
      }
    } else {
      outcome.next = Next::OTHER;
      outcome.nextDesc = kj::str(second.status, " ", escape(second.body));
    }
  }
  return outcome;
}

// =================================================================================================
// The fuzz loop

struct Stats {
  unsigned cases = 0, clean = 0, benign = 0, hostile = 0, tcp = 0, split = 0, eof = 0;
  unsigned firstFailed = 0, closed = 0, reused = 0, refusedLate = 0, failedLate = 0;
  unsigned hostileReused = 0, benignReused = 0, silentMismatch = 0;
  unsigned mutSeen[M_COUNT] = {}, mutReused[M_COUNT] = {};
};

struct Violation {
  kj::String text;
};

kj::String describe(const Case& c, uint64_t seed, unsigned index) {
  return kj::str("seed ", seed, " case ", index, " [", c.kind, c.mustClose ? ",must-close" : "",
      c.tcp ? ",tcp" : ",pipe", c.split ? kj::str(",split@", c.split) : kj::str(), ",",
      c.method == kj::HttpMethod::HEAD ? "HEAD" : "GET", "] ", c.what, "\n    bytes: \"",
      escape(c.bytes), "\"");
}

void check(const Case& c, const Outcome& o, kj::StringPtr where, Stats& stats,
    kj::Vector<Violation>& violations) {
  auto fail = [&](kj::StringPtr why) {
    kj::String firstText = o.first.error == nullptr
        ? kj::str(o.first.status, " \"", escape(o.first.body, 120), "\"")
        : kj::str("error: ", KJ_ASSERT_NONNULL(o.first.error).getDescription());
    violations.add(Violation{kj::str(why, "\n  ", where, "\n    first: ", firstText,
        "\n    after: ", o.after, " (", o.closeReason, ") eofSent=", o.eofSent,
        "\n    next: ", (unsigned)o.next, " ", o.nextDesc)});
  };

  if (o.first.error != nullptr) stats.firstFailed++;
  if (o.eofSent) stats.eof++;
  if (o.after != State::IDLE) stats.closed++;
  if (o.next == Next::MARKER) stats.reused++;
  if (o.next == Next::REFUSED) stats.refusedLate++;
  if (o.next == Next::FAILED) stats.failedLate++;

  // The safety property.
  if (o.first.error != nullptr && o.after == State::IDLE) {
    fail("the first exchange failed, yet the connection was kept for reuse");
  }
  if (o.next == Next::OTHER) {
    fail("REUSE DESYNC: the next request on the reused connection did not get exactly the marker "
         "response");
  }
  if (o.after == State::IDLE && o.eofSent && o.next == Next::MARKER) {
    fail("reused after the peer ended the stream");
  }
  if (c.mustClose && (o.after == State::IDLE)) {
    fail("the response forbids reuse (Connection: close, HTTP/1.0, EOF-delimited, 101), yet the "
         "connection was kept");
  }

  // Agreement: on a reused connection, the body kj-http gave the caller is exactly the body the
  // framer's framing gives (so both ended the response at the same byte).
  if (o.next == Next::MARKER) {
    KJ_IF_SOME(body, framerBody(c.bytes, c.method)) {
      if (o.first.body != body) {
        fail(kj::str("DISAGREEMENT: reused, but kj-http's body differs from the framer's "
            "(framer: \"", escape(body, 120), "\")"));
      }
    } else {
      fail("reused, but the standalone framer does not read one complete response without residue");
    }
  }

  // Clean cases: exact body, reused.
  if (c.exact) {
    KJ_IF_SOME(e, o.first.error) {
      fail(kj::str("an unambiguous response failed: ", e.getDescription()));
    } else if (o.first.status != c.status || o.first.body != c.body) {
      fail(kj::str("an unambiguous response was misread (expected ", c.status, " \"",
          escape(c.body, 120), "\")"));
    }
  }
  if (c.kind == Kind::CLEAN && !o.eofSent) {
    if (o.next != Next::MARKER) fail("an unambiguous response did not leave the connection reused");
  }
  if (c.kind == Kind::CLEAN && o.eofSent) {
    fail("an unambiguous, complete response waited for more input");
  }

  // Benign cases: if reused, the body must be the one meaning the response has.
  if (o.next == Next::MARKER && c.kind == Kind::BENIGN) {
    stats.benignReused++;
    if (o.first.status != c.status || o.first.body != c.body) {
      fail(kj::str("reused after a response whose body was misread (expected ", c.status, " \"",
          escape(c.body, 120), "\")"));
    }
  }
  if (o.next == Next::MARKER && c.kind == Kind::HOSTILE) {
    stats.hostileReused++;
    if (getenv("FRAMING_FUZZ_VERBOSE") != nullptr) {
      fprintf(stderr, "hostile, reused: %s\n    first: %u \"%s\"\n", where.cStr(),
          o.first.status, escape(o.first.body, 120).cStr());
    }
  }
  if (c.kind == Kind::BENIGN && o.first.error == nullptr && o.next != Next::MARKER &&
      (o.first.status != c.status || o.first.body != c.body)) {
    // Not reused, but the caller got a different body without an error: record it.
    stats.silentMismatch++;
  }
}

void fuzz(uint64_t seed, unsigned count, kj::Vector<Violation>& violations) {
  Env env;
  Rng rng(seed);
  Generator gen(rng);
  Stats stats;
  for (unsigned i = 0; i < count; i++) {
    auto c = gen.generate();
    c.tcp = rng.chance(35);
    if (rng.chance(40) && c.bytes.size() > 1) c.split = 1 + rng.below(c.bytes.size() - 1);
    auto where = describe(c, seed, i);

    if (c.exact && !c.mustClose) {
      // The generator and an independent reader must agree on what a clean response means.
      KJ_IF_SOME(ref, referenceRead(c.bytes, c.method)) {
        KJ_ASSERT(ref.status == c.status && ref.body == c.body && ref.end == c.bytes.size(),
            "generator/reference mismatch", where);
      } else if (!c.what.startsWith("lf-eol")) {
        KJ_FAIL_ASSERT("the reference reader does not understand a clean case", where);
      }
    }

    stats.cases++;
    if (c.kind == Kind::CLEAN) stats.clean++;
    if (c.kind == Kind::BENIGN) stats.benign++;
    if (c.kind == Kind::HOSTILE) stats.hostile++;
    if (c.tcp) stats.tcp++;
    if (c.split) stats.split++;

    Outcome outcome;
    KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { outcome = runCase(env, c); })) {
      violations.add(Violation{kj::str("the harness or library failed (a hang is a timeout): ",
          e.getDescription(), "\n  ", where)});
      continue;
    }
    check(c, outcome, where, stats, violations);
  }
  fprintf(stderr,
      "framing-differential seed %llu: %u cases (%u clean, %u benign, %u hostile; %u tcp, %u "
      "split), first failed %u, closed %u, reused %u (benign %u, hostile %u), refused late %u, "
      "failed late %u, eof sent %u, benign-not-reused-with-other-body %u\n",
      (unsigned long long)seed, stats.cases, stats.clean, stats.benign, stats.hostile, stats.tcp,
      stats.split, stats.firstFailed, stats.closed, stats.reused, stats.benignReused,
      stats.hostileReused, stats.refusedLate, stats.failedLate, stats.eof, stats.silentMismatch);
}

void expectNoViolations(kj::Vector<Violation>& violations) {
  size_t shown = 0;
  for (auto& v: violations) {
    if (shown++ >= 12) break;
    KJ_FAIL_EXPECT("framing property violated", v.text);
  }
  if (violations.size() > 12) {
    KJ_FAIL_EXPECT("more violations", violations.size() - 12);
  }
}

constexpr unsigned CASES_PER_SEED = 1500;

KJ_TEST("framing differential: seed 1") {
  kj::Vector<Violation> v;
  fuzz(1, CASES_PER_SEED, v);
  expectNoViolations(v);
}

KJ_TEST("framing differential: seed 2") {
  kj::Vector<Violation> v;
  fuzz(2, CASES_PER_SEED, v);
  expectNoViolations(v);
}

KJ_TEST("framing differential: seed 0x5eed") {
  kj::Vector<Violation> v;
  fuzz(0x5eed, CASES_PER_SEED, v);
  expectNoViolations(v);
}

KJ_TEST("framing differential: seed 20240601") {
  kj::Vector<Violation> v;
  fuzz(20240601, CASES_PER_SEED, v);
  expectNoViolations(v);
}

}  // namespace
}  // namespace sockfetch
