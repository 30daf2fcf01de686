#include "response-framer.h"

#include <sockfetch/kj-compat.h>

#include <kj/debug.h>
#include <kj/vector.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace sockfetch {

namespace {

constexpr size_t INITIAL_BUFFER = 4096;
constexpr size_t KJ_HTTP_MAX_HEADER_BYTES = 120 * 1024;
// The largest header block a kj-http 0.9.2 client surely reads: its header buffer stops growing
// at 128 KiB, and it may share that buffer with the first bytes of the body.
constexpr size_t CACHED_BUFFERS = 16;
constexpr kj::StringPtr HTTP_PREFIX = "HTTP/1."_kj;  // how every status line starts
constexpr size_t NOT_HTTP_SHOWN = 40;
// An answer that is not HTTP is refused once its first line, or this much of it, has come; the
// error shows it.

thread_local bool bufferCacheGone = false;
// Set once the thread's cache is destroyed (the thread is exiting): a framer used after that, from
// another thread-local's destructor say, allocates and frees its buffer itself. A bool has no
// destructor, so it can be read at any point of the thread's exit.

struct BufferCache {
  kj::Vector<kj::Array<kj::byte>> buffers;
  ~BufferCache() { bufferCacheGone = true; }
};

kj::Maybe<kj::Vector<kj::Array<kj::byte>>&> bufferCache() {
  // Buffers of idle framers, kept for the next exchange on this thread: saves a large allocation
  // and free per exchange while idle connections hold no buffer. At most CACHED_BUFFERS. Null
  // once the thread's cache is gone.
  if (bufferCacheGone) return nullptr;
  static thread_local BufferCache cache;
  return cache.buffers;
}

inline char lower(char c) {
  return 'A' <= c && c <= 'Z' ? c - 'A' + 'a' : c;
}

inline bool equalsIgnoreCase(kj::ArrayPtr<const char> a, kj::StringPtr lowerCase) {
  // `lowerCase` is a literal of lower-case letters and '-'; `a` is (part of) a head line, which
  // never contains CR or LF (lines end at either). Setting bit 5 of a byte maps an upper-case
  // letter to its lower case and keeps lower-case letters and '-'; of all other bytes only CR
  // would become one of those ('-'). So one OR per byte compares, eight bytes at a time.
  size_t n = a.size();
  if (n != lowerCase.size()) return false;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t x, y;
    memcpy(&x, a.begin() + i, 8);
    memcpy(&y, lowerCase.begin() + i, 8);
    if ((x | 0x2020202020202020ull) != y) return false;
  }
  for (; i < n; i++) {
    if ((a[i] | 0x20) != lowerCase[i]) return false;
  }
  return true;
}

bool isFieldName(kj::ArrayPtr<const char> name) {
  // What kj-http takes for a field name: one or more of any byte but controls, DEL and RFC 2616's
  // separators (so bytes above 0x7f too).
  if (name.size() == 0) return false;
  for (char c: name) {
    unsigned char u = c;
    if (u <= ' ' || u == 0x7f || strchr("()<>@,;:\\\"/[]?={}", c) != nullptr) return false;
  }
  return true;
}

inline kj::ArrayPtr<const char> nameBefore(kj::ArrayPtr<const char> line, size_t colon) {
  // A field line's name: what precedes its colon at `colon`, less the blanks kj-http removes
  // there (as RFC 9112 asks of a proxy).
  size_t nameEnd = colon;
  while (nameEnd > 0 && (line[nameEnd - 1] == ' ' || line[nameEnd - 1] == '\t')) nameEnd--;
  return line.slice(0, nameEnd);
}

inline kj::ArrayPtr<const char> trim(kj::ArrayPtr<const char> s) {
  size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t' || s[b] == '\r')) b++;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t' || s[e - 1] == '\r')) e--;
  return s.slice(b, e);
}

template <typename Func>
void forEachToken(kj::ArrayPtr<const char> value, Func&& func) {
  // Calls func(token) for each comma-separated, trimmed, non-empty token.
  size_t start = 0;
  for (size_t i = 0; i <= value.size(); i++) {
    if (i == value.size() || value[i] == ',') {
      auto token = trim(value.slice(start, i));
      if (token.size() > 0) func(token);
      start = i + 1;
    }
  }
}

kj::Exception malformed(kj::StringPtr what);

kj::OneOf<uint64_t, kj::Exception> parseContentLength(kj::ArrayPtr<const char> value) {
  // A Content-Length value as kj-http reads it (strtoull(), which skips leading white space of
  // any kind), but only decimal digits after that, and below 10^18 (no overflow).
  size_t start = 0;
  while (start < value.size() && (value[start] == ' ' || value[start] == '\t' ||
         value[start] == '\v' || value[start] == '\f')) {
    start++;
  }
  if (start == value.size()) {
    return malformed(kj::str("invalid Content-Length ", quoteBytes(value)));
  }
  size_t significant = 0;
  uint64_t v = 0;
  for (char c: value.slice(start, value.size())) {
    if (c < '0' || c > '9') {
      return malformed(kj::str("invalid Content-Length ", quoteBytes(value)));
    }
    if (v != 0 || c != '0') significant++;  // leading zeros do not count
    v = v * 10 + (c - '0');  // may wrap past 18 digits: refused below
  }
  if (significant > 18) {
    return malformed(kj::str("Content-Length ", quoteBytes(value), " is too large: values below "
        "10^18 are accepted"));
  }
  return v;
}

struct LineBreak {
  const char* contentEnd;  // where the line's content ends
  const char* next;        // where the next line starts
};

const char* findCrOrLf(const char* p, const char* end) {
  // The first CR or LF in [p, end), or `end`. Sixteen bytes at a time where SSE2 is available
  // (every x86-64), byte by byte elsewhere and for the last few bytes.
#if defined(__SSE2__)
  const __m128i cr = _mm_set1_epi8('\r');
  const __m128i lf = _mm_set1_epi8('\n');
  while (end - p >= 16) {
    __m128i chunk = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    int mask = _mm_movemask_epi8(
        _mm_or_si128(_mm_cmpeq_epi8(chunk, cr), _mm_cmpeq_epi8(chunk, lf)));
    if (mask != 0) return p + __builtin_ctz(static_cast<unsigned>(mask));
    p += 16;
  }
#endif
  while (p < end && *p != '\r' && *p != '\n') p++;
  return p;
}

LineBreak findLineBreak(const char* p, const char* end) {
  // The end of the line starting at `p`, as kj-http sees it: LF, CR LF, or a CR alone.
  const char* lineEnd = findCrOrLf(p, end);
  if (lineEnd == end) return {end, end};
  const char* next = lineEnd + 1;
  if (*lineEnd == '\r' && next < end && *next == '\n') next++;
  return {lineEnd, next};
}

template <typename Func>
void forEachLine(kj::ArrayPtr<const char> block, Func&& func) {
  // Calls func(line, firstPart) for each line of a header block, split exactly as kj-http splits
  // it (the framer must see the same header fields as the kj client it sits under): a line ends
  // at LF, CR LF or a lone CR, and a line that starts with SP or HTAB continues the one before
  // it, that line break read as spaces (obsolete line folding). `line` excludes its line break;
  // its first `firstPart` bytes were on its first physical line (all of them, unless folded).
  const char* p = block.begin();
  const char* end = block.end();
  while (p < end) {
    auto lineBreak = findLineBreak(p, end);
    const char* next = lineBreak.next;
    if (next == end || (*next != ' ' && *next != '\t')) {
      func(kj::arrayPtr(p, lineBreak.contentEnd), size_t(lineBreak.contentEnd - p));
      p = next;
      continue;
    }
    // Folded (rare): join the pieces, each line break becoming as many spaces.
    size_t firstPart = lineBreak.contentEnd - p;
    kj::Vector<char> folded;
    for (;;) {
      folded.addAll(p, lineBreak.contentEnd);
      for (const char* c = lineBreak.contentEnd; c < next; c++) folded.add(' ');
      p = next;
      lineBreak = findLineBreak(p, end);
      next = lineBreak.next;
      if (next == end || (*next != ' ' && *next != '\t')) break;
    }
    folded.addAll(p, lineBreak.contentEnd);
    func(folded.asPtr(), firstPart);
    p = next;
  }
}

kj::Exception malformed(kj::StringPtr what) {
  return KJ_EXCEPTION(FAILED,
      kj::str("the server sent a malformed HTTP response (", what,
          "); the connection was dropped, check the upstream server"));
}

kj::Exception overLimit(kj::StringPtr what, kj::StringPtr setting, size_t limit) {
  // A response over one of the caller's limits: not malformed, but not read either.
  return KJ_EXCEPTION(FAILED, kj::str("the server's response is over a limit: its ", what,
      " exceeds ResponseFramer::Limits::", setting, " (", limit, "); the connection was dropped, "
      "raise the limit if the upstream server is trusted",
      setting == "maxHeaderBytes"_kj && limit == KJ_HTTP_MAX_HEADER_BYTES
          ? " (this one cannot go higher: kj-http reads no larger header block)" : ""));
}

}  // namespace

kj::String quoteBytes(kj::ArrayPtr<const char> bytes, size_t max) {
  kj::Vector<char> out(bytes.size() + 8);
  out.add('"');
  for (size_t i = 0; i < bytes.size() && i < max; i++) {
    unsigned char c = bytes[i];
    if (c == '"' || c == '\\') {
      out.add('\\');
      out.add(c);
    } else if (c == '\r') {
      out.addAll("\\r"_kj);
    } else if (c == '\n') {
      out.addAll("\\n"_kj);
    } else if (c < ' ' || c >= 0x7f) {
      const char* hex = "0123456789abcdef";
      out.addAll("\\x"_kj);
      out.add(hex[c >> 4]);
      out.add(hex[c & 15]);
    } else {
      out.add(c);
    }
  }
  out.add('"');
  if (bytes.size() > max) out.addAll("..."_kj);
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

void refuseRequestTarget(kj::StringPtr url) {
  if (url.size() == 0) {
    kj::throwFatalException(KJ_EXCEPTION(FAILED,
        "the request url is empty; pass a path (\"/\") or an absolute url"));
  }
  kj::throwFatalException(KJ_EXCEPTION(FAILED, kj::str("the request url ", quoteBytes(url),
      " contains a space or a control character, which would corrupt the request line; "
      "percent-encode them")));
}

void refuseEmptyHeaderName() {
  kj::throwFatalException(KJ_EXCEPTION(FAILED, "a request header has an empty name, which would "
      "write a malformed line into the request; remove it, or give it a name"));
}

kj::Maybe<unsigned> parseStatusCode(kj::ArrayPtr<const char> statusLine) {
  if (statusLine.size() < 12 || memcmp(statusLine.begin(), "HTTP/1.", 7) != 0 ||
      statusLine[7] < '0' || statusLine[7] > '9' || statusLine[8] != ' ') {
    return nullptr;
  }
  unsigned status = 0;
  for (size_t i = 9; i < 12; i++) {
    char c = statusLine[i];
    if (c < '0' || c > '9') return nullptr;
    status = status * 10 + (c - '0');
  }
  if (statusLine.size() > 12 && statusLine[12] != ' ') return nullptr;
  if (status < 100) return nullptr;
  return status;
}

ResponseFramer::ResponseFramer(Limits limits): limits(limits) {
  // kj-http 0.9.2 refuses a header block of 128 KiB or more, whatever this limit says, with an
  // error about request headers: the framer refuses it first, and says why.
  this->limits.maxHeaderBytes = kj::min(this->limits.maxHeaderBytes, KJ_HTTP_MAX_HEADER_BYTES);
}

void ResponseFramer::start(kj::HttpMethod requestMethod, bool connectionCarriedResponses) {
  KJ_REQUIRE(begin == end, "a new response may only be framed on a clean connection");
  begin = limit = parsed = end = messageEnd = lineStart = 0;
  trailerBytes = 0;
  trailerFieldSeen = false;
  interimResponses = 0;
  remaining = 0;
  method = requestMethod;
  carriedResponses = connectionCarriedResponses;
  head = Head();
  headParsed = false;
  statusLineStarted = false;
  leadingBlanks = 0;
  headEnd = 0;
  receivedAny = false;
  state = State::HEAD;
}

void ResponseFramer::compact() {
  if (state == State::TRAILERS && lineStart > limit) {
    // The trailer lines parsed so far, never passed on (see parseTrailerLine()): dropped now that
    // room is needed, all at once.
    size_t dead = lineStart - limit;
    memmove(buffer.begin() + limit, buffer.begin() + lineStart, end - lineStart);
    parsed -= dead;
    end -= dead;
    lineStart = limit;
  }
  // Keep the line being parsed from its start: the parser looks back at it (a chunk-size line or
  // a trailer line may not be complete yet; after chunk data, a CR may have been seen already).
  bool inLine = state == State::HEAD || state == State::CHUNK_LINE || state == State::TRAILERS ||
      state == State::CHUNK_CRLF;
  size_t shift = inLine ? kj::min(begin, lineStart) : begin;
  if (shift == 0) return;
  headEnd = 0;  // the head, if parsed, is no longer where it was
  memmove(buffer.begin(), buffer.begin() + shift, end - shift);
  begin -= shift;
  limit -= shift;
  parsed -= shift;
  end -= shift;
  messageEnd = messageEnd >= shift ? messageEnd - shift : 0;
  lineStart = lineStart >= shift ? lineStart - shift : 0;
}

kj::ArrayPtr<kj::byte> ResponseFramer::space() {
  if (end < headEnd) headEnd = 0;  // what is read next may land on the head (see take())
  if (buffer.size() == 0) {
    KJ_IF_SOME(cache, bufferCache()) {
      if (!cache.empty()) {
        buffer = kj::mv(cache.back());
        cache.removeLast();
      }
    }
    if (buffer.size() == 0) buffer = kj::heapArray<kj::byte>(INITIAL_BUFFER);
  }
  if (end == buffer.size()) compact();
  if (end == buffer.size()) {
    // Full of bytes that cannot be passed on yet: a header block (or a line) still growing.
    size_t cap = limits.maxHeaderBytes + kj::min(limits.maxChunkLineBytes,
        SIZE_MAX - limits.maxHeaderBytes);  // no wrap-around
    if (buffer.size() >= cap) {
      kj::throwFatalException(overLimit("header block", "maxHeaderBytes", limits.maxHeaderBytes));
    }
    auto bigger = kj::heapArray<kj::byte>(kj::min(buffer.size() * 2, cap));
    memcpy(bigger.begin(), buffer.begin(), end);
    buffer = kj::mv(bigger);
  }
  return buffer.slice(end, buffer.size());
}

void ResponseFramer::received(size_t n) {
  KJ_REQUIRE(end + n <= buffer.size());
  end += n;
  if (n > 0) receivedAny = true;
  if (failure != nullptr) return;
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { parse(); })) {
    failure = kj::mv(e);
  }
}

void ResponseFramer::fail(kj::Exception&& e) {
  if (failure == nullptr) failure = kj::mv(e);
}

void ResponseFramer::receivedEof() {
  if (failure != nullptr) return;
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { parseEof(); })) {
    failure = kj::mv(e);
  }
}

void ResponseFramer::parseEof() {
  switch (state) {
    case State::UNTIL_EOF:
      messageEnd = end;
      state = State::COMPLETE;
      return;
    case State::PASS_THROUGH:
    case State::COMPLETE:
    case State::IDLE:
      return;
    case State::HEAD:
      if (!startsLikeStatusLine()) kj::throwFatalException(notAStatusLine(firstLineSoFar()));
      if (end == begin && !headParsed) {
        if (interimResponses > 0) {
          kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "the server closed the connection "
              "after an interim (1xx) response, without sending the final one; retry on a new "
              "connection if the request is safe to repeat"));
        }
        kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED,
            "the server closed the connection without sending a response; retry on a new "
            "connection if the request is safe to repeat"));
      }
      kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "the connection closed in the middle "
          "of the response head, so the response is incomplete; retry on a new connection if the "
          "request is safe to repeat"));
    default:
      kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "the connection closed before the end "
          "of the response body, so the response is incomplete; retry on a new connection if the "
          "request is safe to repeat"));
  }
}

size_t ResponseFramer::take(kj::ArrayPtr<kj::byte> out) {
  size_t n = kj::min(out.size(), limit - begin);
  if (n == 0) return 0;
  memcpy(out.begin(), buffer.begin() + begin, n);
  begin += n;
  bool lineless = state == State::LENGTH || state == State::CHUNK_DATA ||
      state == State::UNTIL_EOF || state == State::PASS_THROUGH || state == State::COMPLETE;
  if (begin == end && lineless) {
    // Everything received was consumed: reuse the buffer from its start.
    begin = limit = parsed = end = messageEnd = lineStart = 0;
  }
  return n;
}

bool ResponseFramer::mayGrow() const {
  switch (state) {
    case State::TRAILERS:
    case State::COMPLETE:
    case State::IDLE:
      return false;
    default:
      return true;
  }
}

bool ResponseFramer::endsWithBody() const {
  switch (state) {
    case State::CHUNK_LINE:
    case State::CHUNK_DATA:
    case State::CHUNK_CRLF:
    case State::TRAILERS:
      return false;
    default:
      return headParsed;
  }
}

kj::Maybe<kj::StringPtr> ResponseFramer::whyNotReusable() const {
  if (!headParsed) return "no complete response was received"_kj;
  if (head.status == 101) return "the connection was upgraded to another protocol"_kj;
  if (head.connectionClose) return "the server sent `Connection: close`"_kj;
  if (head.http10 && !head.keepAlive) {
    return "the server answered with HTTP/1.0 without `Connection: keep-alive`"_kj;
  }
  if (head.http10 && head.transferEncoding) {
    // RFC 9112 6.1: an HTTP/1.0 sender may have kept part of such a message back.
    return "the server answered with HTTP/1.0 and Transfer-Encoding, which HTTP/1.0 does not "
        "define, so where its response ends cannot be trusted"_kj;
  }
  if (head.conflictingFraming) {
    return "the response had both Transfer-Encoding and Content-Length"_kj;
  }
  if (state == State::UNTIL_EOF || (state == State::COMPLETE && remaining == UINT64_MAX)) {
    return "the response body was delimited by the server closing the connection"_kj;
  }
  return nullptr;
}

size_t ResponseFramer::residueSize() const {
  if (state == State::COMPLETE) return end - kj::max(messageEnd, begin);
  if (state == State::IDLE) return end - begin;
  return 0;
}

size_t ResponseFramer::directReadLimit() const {
  if (begin != end || failure != nullptr) return 0;
  switch (state) {
    case State::LENGTH:
    case State::CHUNK_DATA:
      return remaining > SIZE_MAX ? SIZE_MAX : size_t(remaining);
    case State::UNTIL_EOF:
    case State::PASS_THROUGH:
      return SIZE_MAX;
    default:
      return 0;
  }
}

void ResponseFramer::receivedDirect(size_t n) {
  KJ_REQUIRE(n <= directReadLimit());
  if (n > 0) receivedAny = true;
  switch (state) {
    case State::LENGTH:
      remaining -= n;
      if (remaining == 0) {
        messageEnd = end;
        state = State::COMPLETE;
      }
      break;
    case State::CHUNK_DATA:
      remaining -= n;
      if (remaining == 0) {
        state = State::CHUNK_CRLF;
        lineStart = parsed = limit = end;
      }
      break;
    default:
      break;
  }
}

void ResponseFramer::finish() {
  KJ_REQUIRE(state == State::COMPLETE && begin == limit);
  begin = limit = parsed = messageEnd;
  if (begin == end) begin = limit = parsed = end = messageEnd = lineStart = 0;
  state = State::IDLE;
}

kj::Array<kj::byte> ResponseFramer::takeAll() {
  auto result = kj::heapArray<kj::byte>(buffer.slice(begin, end));
  begin = limit = parsed = end = messageEnd = lineStart = 0;
  state = State::PASS_THROUGH;
  return result;
}

void ResponseFramer::passThrough() {
  state = State::PASS_THROUGH;
  parsed = limit = end;
}

void ResponseFramer::freeBuffer() {
  // Only between responses: within one, positions carry what was seen (a CR after chunk data is
  // known by where it lies), and resetting them would forget it.
  if (begin == end && state == State::IDLE) {
    KJ_IF_SOME(cache, bufferCache()) {
      if (buffer.size() == INITIAL_BUFFER && cache.size() < CACHED_BUFFERS) {
        cache.add(kj::mv(buffer));
      }
    }
    buffer = nullptr;
    begin = limit = parsed = end = messageEnd = lineStart = headEnd = 0;
  }
}

void ResponseFramer::parse() {
  const char* chars = reinterpret_cast<const char*>(buffer.begin());
  KJ_DEFER(closeGap());  // (see keepOnly())
  while (parsed < end) {
    switch (state) {
      case State::IDLE:
      case State::COMPLETE:
        return;  // residue: left for the owner to judge

      case State::PASS_THROUGH:
      case State::UNTIL_EOF:
        parsed = limit = end;
        break;

      case State::HEAD:
        if (!parseHeaderBlock()) return;
        break;

      case State::NO_BODY:
        KJ_UNREACHABLE;

      case State::LENGTH:
      case State::CHUNK_DATA: {
        size_t n = kj::min(remaining, uint64_t(end - parsed));
        parsed += n;
        limit = parsed;
        remaining -= n;
        if (remaining == 0) {
          if (state == State::LENGTH) {
            messageEnd = parsed;
            state = State::COMPLETE;
          } else {
            state = State::CHUNK_CRLF;
            lineStart = parsed;
          }
        }
        break;
      }

      case State::CHUNK_CRLF: {
        // Exactly CRLF (or a bare LF, which kj-http also accepts) must follow chunk data.
        char c = chars[parsed];
        if (c == '\r' && parsed == lineStart) {
          parsed++;
        } else if (c == '\n') {
          parsed++;
          state = State::CHUNK_LINE;
          lineStart = parsed;
        } else {
          kj::throwFatalException(malformed("chunk data not followed by CRLF"));
        }
        limit = parsed;
        break;
      }

      case State::CHUNK_LINE: {
        // Passed on only once complete, and then as kj-http 0.9.2 can read it.
        auto nl = reinterpret_cast<const char*>(
            memchr(chars + parsed, '\n', end - parsed));
        // The line so far, complete or not, is held to the limit.
        size_t lineEnd = nl == nullptr ? end : nl - chars;
        if (lineEnd - lineStart > limits.maxChunkLineBytes) {
          kj::throwFatalException(overLimit("chunk-size line", "maxChunkLineBytes",
              limits.maxChunkLineBytes));
        }
        if (nl == nullptr) {
          parsed = end;
          break;
        }
        auto digits = parseChunkLine(kj::arrayPtr(chars + lineStart, lineEnd - lineStart));
        keepOnly(digits.begin() - chars, digits.size(),
            lineEnd > lineStart && chars[lineEnd - 1] == '\r' ? lineEnd - 1 : lineEnd);
        parsed = lineEnd + 1;
        limit = parsed;
        lineStart = parsed;
        if (remaining == 0) {
          state = State::TRAILERS;
        } else {
          state = State::CHUNK_DATA;
        }
        break;
      }

      case State::TRAILERS:
        if (!parseTrailerLine()) return;
        break;
    }
  }
}

bool ResponseFramer::startsLikeStatusLine() {
  // Whether what came so far of the head may begin a status line (after the blanks trim() skips).
  // Once the whole "HTTP/1." has come, that is known for this head (statusLineStarted).
  auto chars = reinterpret_cast<const char*>(buffer.begin());
  size_t i = lineStart + leadingBlanks;  // (blanks that came in earlier reads are not rescanned)
  while (i < end && (chars[i] == ' ' || chars[i] == '\t')) i++;
  leadingBlanks = i - lineStart;
  size_t n = kj::min(end - i, HTTP_PREFIX.size());
  if (n == 0) return true;  // (and there may be no buffer at all)
  if (memcmp(chars + i, HTTP_PREFIX.begin(), n) != 0) return false;
  statusLineStarted = n == HTTP_PREFIX.size();
  return true;
}

kj::ArrayPtr<const char> ResponseFramer::firstLineSoFar() const {
  // The head's first line as far as it came, up to its line end, and at most one byte more than
  // an error shows (for quoteBytes() to mark the cut).
  auto chars = reinterpret_cast<const char*>(buffer.begin());
  auto window = kj::arrayPtr(chars + lineStart, kj::min(end - lineStart, NOT_HTTP_SHOWN + 1));
  return kj::arrayPtr(window.begin(), findCrOrLf(window.begin(), window.end()));
}

kj::Exception ResponseFramer::notAStatusLine(kj::ArrayPtr<const char> line) const {
  // The answer should have begun with a status line, and did not. What that says depends on what
  // this server sent before on the connection.
  auto shown = line.size() > 0 ? quoteBytes(line, NOT_HTTP_SHOWN) : kj::str("an empty line");
  if (interimResponses > 0) {
    return malformed(kj::str("after an interim (1xx) response, the next response began with ",
        shown, " instead of a status line"));
  }
  if (carriedResponses) {
    return KJ_EXCEPTION(FAILED, kj::str("the server's answer began with ", shown, ", not a "
        "status line, on a connection that carried earlier responses: most likely the rest of "
        "an earlier response (a body on a HEAD, 204 or 304, or more than its Content-Length); "
        "the connection was dropped, retry the request if it is safe to repeat, and stop "
        "reusing this server's connections (ConnectionPool::Settings::neverReuse) if it "
        "happens again"));
  }
  return KJ_EXCEPTION(FAILED, kj::str("the server's answer is not HTTP/1.x (it began with ", shown,
      "); the connection was dropped, check that the upstream address is an HTTP server"));
}

bool ResponseFramer::parseHeaderBlock() {
  // Looks for the blank line that ends the header block starting at `lineStart`.
  const char* chars = reinterpret_cast<const char*>(buffer.begin());
  if (!statusLineStarted && !startsLikeStatusLine()) {
    // Not HTTP/1.x: refused once its first line is complete (or long enough to show), rather
    // than when a head that may never come is (a server speaking another protocol may wait for
    // us forever). Shown the same way however the bytes arrived.
    auto line = firstLineSoFar();
    if (line.size() == end - lineStart && line.size() <= NOT_HTTP_SHOWN) {
      parsed = end;  // no line end yet, and not long enough to show
      return false;
    }
    kj::throwFatalException(notAStatusLine(line));
  }
  size_t scan = parsed > lineStart + 3 ? parsed - 3 : lineStart;
  for (;;) {
    auto nl = reinterpret_cast<const char*>(memchr(chars + scan, '\n', end - scan));
    if (nl == nullptr) break;
    size_t i = nl - chars;
    // 0: not the end, or not known yet (the scan then goes on, and stops for want of a LF).
    size_t blockEnd = headEndAfterLf(kj::arrayPtr(chars, end), i);
    if (blockEnd != 0) {
      if (blockEnd - lineStart > limits.maxHeaderBytes) {
        kj::throwFatalException(overLimit("header block", "maxHeaderBytes", limits.maxHeaderBytes));
      }
      size_t blockStart = lineStart;  // parseHead() moves lineStart on, to the body
      parseHead(kj::arrayPtr(chars + lineStart, blockEnd - lineStart));
      if (head.status >= 100 && head.status < 200 && head.status != 101) {
        // Interim response: drop it entirely, as if it was never sent.
        if (++interimResponses > limits.maxInterimResponses) {
          kj::throwFatalException(overLimit("count of interim (1xx) responses",
              "maxInterimResponses", limits.maxInterimResponses));
        }
        if (begin == lineStart && limit == lineStart) {
          // Nothing before it is waiting to be taken (the usual case): skip it where it lies,
          // for compact() to drop. Moving what follows it instead would cost, per interim
          // response, all that came with it.
          begin = limit = parsed = lineStart = blockEnd;
        } else {
          memmove(buffer.begin() + lineStart, buffer.begin() + blockEnd, end - blockEnd);
          end -= blockEnd - lineStart;
          parsed = lineStart;
        }
        head = Head();
        statusLineStarted = false;
        leadingBlanks = 0;
        return true;
      }
      headParsed = true;
      headStart = blockStart;
      headEnd = blockEnd;
      parsed = limit = blockEnd;
      if (head.status == 101) {
        // Everything after the head belongs to the new protocol.
        state = State::PASS_THROUGH;
        parsed = limit = end;
      } else if (method == kj::HttpMethod::HEAD || head.status == 204 || head.status == 304) {
        messageEnd = blockEnd;
        state = State::COMPLETE;
        head.noBody = true;
      }
      // Otherwise parseHead() chose the body state.
      return true;
    }
    scan = i + 1;
  }
  parsed = end;
  if (end - lineStart > limits.maxHeaderBytes) {
    kj::throwFatalException(overLimit("header block", "maxHeaderBytes", limits.maxHeaderBytes));
  }
  return false;
}

void ResponseFramer::parseHead(kj::ArrayPtr<const char> block) {
  head = Head();
  kj::Maybe<uint64_t> contentLength;
  kj::Maybe<kj::Exception> contentLengthError;  // the first; it matters only if there is a body
  bool hasContentLength = false;  // parsed or not
  bool hasTransferEncoding = false;
  bool identity = false;  // `Transfer-Encoding: identity`
  kj::Maybe<kj::String> transferEncodingShown;  // set if it is not `chunked` alone
  unsigned status = 0;
  bool first = true;
  forEachLine(block, [&](kj::ArrayPtr<const char> line, size_t firstPart) {
    if (first) {
      first = false;
      parseStatusLine(trim(line));
      status = head.status;
      return;
    }
    if (line.size() == 0) return;  // the blank line that ends the block
    // field-name, optional whitespace (kj-http removes it, as RFC 9112 asks of a proxy), colon.
    // Where kj-http accepts the line, its name is exactly what precedes the first colon, less
    // that whitespace; where it does not, the response fails anyway.
    auto colonPtr = reinterpret_cast<const char*>(memchr(line.begin(), ':', line.size()));
    if (colonPtr == nullptr) kj::throwFatalException(malformed("header line without a colon"));
    size_t colon = colonPtr - line.begin();
    auto name = nameBefore(line, colon);
    if (name.size() == 0) kj::throwFatalException(malformed("header line without a name"));
    char c0 = lower(name[0]);
    bool interesting = (c0 == 'c' && (name.size() == 14 || name.size() == 10)) ||
        (c0 == 't' && name.size() == 17);
    if (!interesting) return;
    // The framing fields' values as kj-http keeps them: it skips the blanks after the colon on
    // the field's first line, and keeps the rest (blanks after the value, and where the field is
    // folded, the spaces that stand for the line break). An empty one it takes for an absent
    // field, even when repeated.
    size_t valueStart = colon + 1;
    while (valueStart < firstPart && (line[valueStart] == ' ' || line[valueStart] == '\t')) {
      valueStart++;
    }
    auto raw = line.slice(valueStart, line.size());
    if (equalsIgnoreCase(name, "content-length"_kj)) {
      // One decimal number. RFC 9110 8.6 lets a recipient accept a list of identical values, or
      // the field repeated with them, but kj-http joins repeated fields into a list and reads no
      // list: refused (below, if there is a body) where the error can say so.
      if (raw.size() == 0) {
        // Absent for kj-http, unless one came before: then kj-http joins them ("5, ").
        if (hasContentLength && contentLengthError == nullptr) {
          contentLengthError = malformed("Content-Length sent more than once, which kj-http "
              "cannot read");
        }
        return;
      }
      hasContentLength = true;
      KJ_SWITCH_ONEOF(parseContentLength(raw)) {
        KJ_CASE_ONEOF(n, uint64_t) {
          KJ_IF_SOME(previous, contentLength) {
            if (contentLengthError == nullptr) {
              contentLengthError = malformed(previous != n ? "conflicting Content-Length"
                  : "Content-Length sent more than once, which kj-http cannot read");
            }
          }
          contentLength = n;
        }
        KJ_CASE_ONEOF(e, kj::Exception) {
          if (contentLengthError == nullptr) contentLengthError = kj::mv(e);
        }
      }
    } else if (equalsIgnoreCase(name, "transfer-encoding"_kj)) {
      // kj-http decodes `chunked` alone, and joins repeated fields into a list, which it refuses
      // (as every other coding): checked below, for responses that have a body.
      if (raw.size() == 0) {
        // Absent for kj-http, unless one came before: then kj-http joins them ("chunked, ").
        if (hasTransferEncoding) transferEncodingShown = kj::str("sent more than once");
        return;
      }
      if (hasTransferEncoding) {
        transferEncodingShown = kj::str("sent more than once");
      } else if (equalsIgnoreCase(raw, "identity"_kj)) {
        identity = true;  // kj-http reads the body to the end of the connection
      } else if (!equalsIgnoreCase(raw, "chunked"_kj)) {
        transferEncodingShown = quoteBytes(raw);  // `raw` may not outlive this call
      }
      hasTransferEncoding = true;
    } else if (equalsIgnoreCase(name, "connection"_kj)) {
      auto value = trim(line.slice(colon + 1, line.size()));
      forEachToken(value, [&](kj::ArrayPtr<const char> token) {
        if (equalsIgnoreCase(token, "close"_kj)) head.connectionClose = true;
        if (equalsIgnoreCase(token, "keep-alive"_kj)) head.keepAlive = true;
      });
    }
  });

  head.transferEncoding = hasTransferEncoding;
  if (status < 200 || status == 204 || status == 304 || method == kj::HttpMethod::HEAD) {
    return;  // no body (kj-http reads no framing field then); parseHeaderBlock() completes it
  }
  if (hasTransferEncoding) {
    KJ_IF_SOME(shown, transferEncodingShown) {
      kj::throwFatalException(KJ_EXCEPTION(FAILED, kj::str("the server sent a response whose "
          "Transfer-Encoding (", shown, ") kj-http cannot decode: it reads `chunked` alone; the "
          "connection was dropped, configure the upstream server to send chunked or "
          "Content-Length bodies")));
    }
    // (kj-http ignores Content-Length then, valid or not; the connection is not reused.)
    head.conflictingFraming = hasContentLength;
    if (identity) {
      state = State::UNTIL_EOF;
      remaining = UINT64_MAX;
    } else {
      state = State::CHUNK_LINE;
    }
  } else if (contentLengthError != nullptr) {
    // Only where Content-Length frames the body (kj-http reads chunked when both are there).
    kj::throwFatalException(kj::mv(KJ_ASSERT_NONNULL(contentLengthError)));
  } else KJ_IF_SOME(n, contentLength) {
    remaining = n;
    state = State::LENGTH;
    if (n == 0) {
      state = State::COMPLETE;
      head.noBody = true;
      // messageEnd is set by the caller's bookkeeping below.
    }
  } else {
    state = State::UNTIL_EOF;
    remaining = UINT64_MAX;
  }
  // Set positions for the body states; the caller sets parsed/limit to the end of the block.
  lineStart = static_cast<size_t>(block.end() - reinterpret_cast<const char*>(buffer.begin()));
  if (state == State::COMPLETE) messageEnd = lineStart;
}

void ResponseFramer::parseStatusLine(kj::ArrayPtr<const char> statusLine) {
  KJ_IF_SOME(status, parseStatusCode(statusLine)) {
    head.http10 = statusLine[7] == '0';
    head.status = status;
  } else {
    kj::throwFatalException(malformed("invalid status line"));
  }
}

kj::Maybe<kj::String> ResponseFramer::findFieldKjRefuses() const {
  // (take() may have moved the offsets back to the buffer's start once everything was taken; the
  // head's bytes stay where they are until space() hands that place out again.)
  if (!headParsed || headEnd == 0 || headEnd > buffer.size()) return nullptr;
  auto chars = reinterpret_cast<const char*>(buffer.begin());
  kj::Maybe<kj::String> found;
  bool first = true;
  bool emptyLine = false;
  bool framed = false;
  bool byteranges = false;
  bool sawContentType = false;
  forEachLine(kj::arrayPtr(chars + headStart, headEnd - headStart),
      [&](kj::ArrayPtr<const char> line, size_t firstPart) {
    if (found != nullptr) return;
    if (first) {
      first = false;
      // kj-http reads the head as C strings: a NUL anywhere ends it.
      if (memchr(line.begin(), '\0', line.size()) != nullptr) {
        found = kj::str("a NUL byte in the status line ", quoteBytes(line));
      }
      return;
    }
    if (line.size() == 0) {
      emptyLine = true;  // the end of the head, unless a field follows
      return;
    }
    if (emptyLine) {
      // kj-http ends a line at a lone CR too, and then finds no field in the line break after it.
      found = kj::str("an empty line inside the head, before ", quoteBytes(line));
      return;
    }
    auto colon = reinterpret_cast<const char*>(memchr(line.begin(), ':', line.size()));
    if (colon == nullptr) return;  // the framer refuses those itself
    size_t nameEnd = colon - line.begin();
    if (nameEnd >= firstPart) {
      // kj-http folds values only: a name continued on the next line is no name.
      found = kj::str("a field name continued on the next line in ", quoteBytes(line));
      return;
    }
    size_t valueStart = nameEnd + 1;
    auto name = nameBefore(line, nameEnd);
    if (equalsIgnoreCase(name, "content-length"_kj) ||
        equalsIgnoreCase(name, "transfer-encoding"_kj)) {
      framed = framed || trim(line.slice(valueStart, line.size())).size() > 0;  // (empty: none)
    } else if (name.size() == 12 && equalsIgnoreCase(name, "content-type"_kj)) {
      // kj-http joins repeated fields: the first non-empty one starts the value it looks at.
      auto value = trim(line.slice(valueStart, line.size()));
      if (!sawContentType && value.size() > 0) {
        sawContentType = true;
        byteranges = value.size() >= 20 &&
            equalsIgnoreCase(value.slice(0, 20), "multipart/byteranges"_kj);
      }
    }
    if (!isFieldName(name)) {
      found = kj::str("invalid field name in ", quoteBytes(line));
      return;
    }
    if (memchr(line.begin(), '\0', line.size()) != nullptr) {
      found = kj::str("a NUL byte in the field ", quoteBytes(line));
    }
  });
  if (found == nullptr && byteranges && !framed && state == State::UNTIL_EOF) {
    found = kj::str("a multipart/byteranges body without Content-Length or Transfer-Encoding, "
        "which kj-http refuses to read");
  }
  return kj::mv(found);
}

kj::ArrayPtr<const char> ResponseFramer::parseChunkLine(kj::ArrayPtr<const char> line) {
  // chunk-size [ chunk-ext ] CRLF, where chunk-size is hex. Returns the size's significant digits.
  auto text = trim(line);
  size_t i = 0;
  uint64_t size = 0;
  while (i < text.size()) {
    char c = lower(text[i]);
    unsigned digit;
    if ('0' <= c && c <= '9') {
      digit = c - '0';
    } else if ('a' <= c && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      break;
    }
    if (size >> 56) kj::throwFatalException(malformed("chunk size too large"));
    size = size * 16 + digit;
    i++;
  }
  if (i == 0) kj::throwFatalException(malformed("invalid chunk-size line"));
  auto rest = trim(text.slice(i, text.size()));
  if (rest.size() > 0 && rest[0] != ';') {
    kj::throwFatalException(malformed("invalid chunk-size line"));
  }
  remaining = size;
  // Without leading zeros (all but the last of a zero size): kj-http 0.9.2 refuses a chunk-size
  // line longer than 32 bytes when it does not have the whole line in one read, and a size below
  // 2^60 (checked above) has at most 15 significant digits.
  size_t first = 0;
  while (first + 1 < i && text[first] == '0') first++;
  return text.slice(first, i);
}

void ResponseFramer::keepOnly(size_t from, size_t size, size_t lineEnd) {
  // Rewrites the line at lineStart, which ends at `lineEnd` (its CR or LF), to just the `size`
  // bytes at `from`: kj-http 0.9.2 rejects any chunk extension (and whitespace, and leading zeros
  // past 32 bytes) in a chunk-size line, where RFC 9112 7.1.1 says to ignore extensions. The
  // bytes removed become the gap, and what lies between the gap and this line moves down over
  // the old one: positions from this line on stay as they are until parse() ends and closes the
  // gap (closeGap()), so that each byte a parse() receives moves once, however many lines it
  // rewrites (moving all that follows for each line costs lines times the buffer's size, which
  // a head near maxHeaderBytes makes large).
  size_t removed = (lineEnd - lineStart) - size;
  if (removed == 0) return;
  auto* bytes = buffer.begin();
  size_t newLineStart = lineStart - gapSize;
  if (gapSize > 0) {
    size_t gapEnd = gapAt + gapSize;
    memmove(bytes + gapAt, bytes + gapEnd, lineStart - gapEnd);
  }
  memmove(bytes + newLineStart, bytes + from, size);
  gapAt = newLineStart + size;
  gapSize += removed;  // (the gap now ends at lineEnd)
}

void ResponseFramer::closeGap() {
  // Moves what follows the gap down over it, and every position past it with it. Positions before
  // it (begin, the head's) were fixed before the first line was rewritten; none lies inside it.
  if (gapSize == 0) return;
  size_t gapEnd = gapAt + gapSize;
  auto* bytes = buffer.begin();
  memmove(bytes + gapAt, bytes + gapEnd, end - gapEnd);
  for (size_t* position: {&end, &parsed, &limit, &lineStart, &messageEnd}) {
    if (*position >= gapEnd) *position -= gapSize;
  }
  gapSize = 0;
}

void ResponseFramer::checkTrailerLimits(size_t lineBytes, size_t sectionBefore, bool counted) {
  // The trailer line so far (`lineBytes`, its LF not included) against maxChunkLineBytes, and the
  // section so far (`sectionBefore` bytes before this line, and this line if `counted`: the empty
  // line that ends it is not) against maxTrailerBytes. When both are over, the one this line's
  // bytes crossed first is named, as it would be had they come a byte at a time: the same error
  // however the reads fall. (A tie names the line.)
  size_t lineCross = lineBytes > limits.maxChunkLineBytes ? limits.maxChunkLineBytes : SIZE_MAX;
  size_t sectionCross = SIZE_MAX;
  if (counted && trailerBytes > limits.maxTrailerBytes) {
    sectionCross = sectionBefore >= limits.maxTrailerBytes ? 0
        : limits.maxTrailerBytes - sectionBefore;
  }
  if (lineCross == SIZE_MAX && sectionCross == SIZE_MAX) return;
  if (lineCross <= sectionCross) {
    kj::throwFatalException(overLimit("trailer line", "maxChunkLineBytes",
        limits.maxChunkLineBytes));
  }
  kj::throwFatalException(overLimit("trailer section", "maxTrailerBytes",
      limits.maxTrailerBytes));
}

bool ResponseFramer::parseTrailerLine() {
  const char* chars = reinterpret_cast<const char*>(buffer.begin());
  auto nl = reinterpret_cast<const char*>(memchr(chars + parsed, '\n', end - parsed));
  if (nl == nullptr) {
    trailerBytes += end - parsed;
    parsed = end;
    // The empty line that ends the section is not counted: until more arrives, this may be it.
    // (Only an empty line ends it; see below. Telling so from the line's length, not its bytes,
    // keeps a line that grows a byte per read from being rescanned per read.)
    size_t lineBytes = end - lineStart;
    bool mayBeLast = lineBytes == 0 || (lineBytes == 1 && chars[lineStart] == '\r');
    checkTrailerLimits(lineBytes, trailerBytes - lineBytes, !mayBeLast);
    return false;
  }
  size_t lineEnd = nl - chars;
  trailerBytes += lineEnd + 1 - parsed;
  size_t contentEnd = lineEnd > lineStart && chars[lineEnd - 1] == '\r' ? lineEnd - 1 : lineEnd;
  checkTrailerLimits(lineEnd - lineStart, trailerBytes - (lineEnd + 1 - lineStart),
      contentEnd != lineStart);
  auto line = trim(kj::arrayPtr(chars + lineStart, lineEnd - lineStart));
  if (contentEnd == lineStart) {
    // The empty line that ends the section. (A line of blanks is not empty: after a field it
    // continues it, as any fold does; before one it is not a field.)
    parsed = lineEnd + 1;
    lineStart = parsed;
    messageEnd = parsed;
    state = State::COMPLETE;
    return true;
  }
  bool fold = chars[lineStart] == ' ' || chars[lineStart] == '\t';
  if (!fold || !trailerFieldSeen) {
    // A field line (a fold, which begins with a blank, continues the one before it): anything
    // else is not a trailer but bytes the server should not have sent, a second response perhaps.
    auto raw = kj::arrayPtr(chars + lineStart, lineEnd - lineStart);
    auto colon = reinterpret_cast<const char*>(memchr(raw.begin(), ':', raw.size()));
    if (colon == nullptr || !isFieldName(nameBefore(raw, colon - raw.begin()))) {
      auto shown = line.size() == 0 ? kj::str("a line of blanks")
          : quoteBytes(line.slice(0, kj::min(line.size(), NOT_HTTP_SHOWN + 1)), NOT_HTTP_SHOWN);
      kj::throwFatalException(malformed(kj::str("a line in its trailer section that is not a "
          "field: ", shown)));
    }
    trailerFieldSeen = true;
  }
  // Trailers are never passed on: the line is left where it is, dead, between `limit` and the
  // next line, until compact() drops all the dead ones at once (the trailer section's limit may
  // exceed the buffer's). Dropping each line as it is parsed would move all that follows it, per
  // line.
  parsed = lineEnd + 1;
  lineStart = parsed;
  return true;
}

}  // namespace sockfetch
