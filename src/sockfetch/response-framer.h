#pragma once

#include <kj/array.h>
#include <kj/compat/http.h>
#include <kj/string.h>

namespace sockfetch {

kj::String quoteBytes(kj::ArrayPtr<const char> bytes, size_t max = 40);
// `bytes` (at most `max` of them, then "...") in double quotes, with anything outside printable
// ASCII escaped: for error messages that show what came from the wire, or what a caller passed.

[[noreturn]] void refuseRequestTarget(kj::StringPtr url);

inline void requireValidRequestTarget(kj::StringPtr url) {
  // (Inline: every request passes here.)
  for (unsigned char c: url) {
    if (c <= ' ' || c == 0x7f) refuseRequestTarget(url);
  }
  if (url.size() == 0) refuseRequestTarget(url);
}
// Throws FAILED unless `url` may go into a request line as it is: not empty, and without spaces or
// control characters. kj-http 0.9.2 writes a url unchecked, so CR LF in one would add headers, or
// a whole second request, to the request sent.

[[noreturn]] void refuseEmptyHeaderName();

inline void requireValidHeaders(const kj::HttpHeaders& headers) {
  // (Inline: every request passes here. A name in the table is never empty.)
  headers.forEach([](kj::HttpHeaderId, kj::StringPtr) {}, [](kj::StringPtr name, kj::StringPtr) {
    if (name.size() == 0) refuseEmptyHeaderName();
  });
}
// Throws FAILED if a header has an empty name: kj-http 0.9.2 accepts one (HttpHeaders::add("",
// value)) and writes it as a line ": value", which no HTTP/1.1 server can parse and which
// intermediaries may read differently. (kj-http itself refuses CR, LF and NUL in values.)

kj::Maybe<unsigned> parseStatusCode(kj::ArrayPtr<const char> statusLine);
// The status code of an HTTP/1.x status line ("HTTP/1.x SP 3DIGIT [SP reason]", RFC 9112 4,
// without its line end), or null if the line is not one (or its code is below 100).

inline size_t headEndAfterLf(kj::ArrayPtr<const char> bytes, size_t lf) {
  // `bytes[lf]` is a LF. If the line after it is empty (LF, or CR LF), the header block ends
  // there: returns the index just past that empty line. Returns 0 if it is not empty, or if
  // `bytes` end before that can be told.
  if (lf + 1 < bytes.size() && bytes[lf + 1] == '\n') return lf + 2;
  if (lf + 2 < bytes.size() && bytes[lf + 1] == '\r' && bytes[lf + 2] == '\n') return lf + 3;
  return 0;
}

class ResponseFramer {
  // Knows where one HTTP/1.x response ends on a connection, so that the per-exchange
  // kj::HttpClient reading through it is never handed a byte that belongs to anything after it.
  //
  // This is a pure parser over a buffer; it does no I/O. Its owner reads from the connection into
  // space(), reports the count with received() (or the end of the stream with receivedEof()), and
  // passes bytes on to the HTTP client with take(). Of the bytes received it passes on only:
  //  - the final response's header block (interim 1xx responses other than 101 are removed, so
  //    the client never mistakes `100 Continue` or `103 Early Hints` for the response), and
  //  - its body framing and data up to the end of the body. For a chunked body that is the end of
  //    the last-chunk line (`0\r\n`): trailers and the final CRLF are parsed here, never passed on,
  //    because kj-http 0.9.2 stops reading at the last-chunk line.
  // Anything received after the end of the response is residue (residueSize()); the owner decides
  // what it means (for an HTTP/1.1 client: the server sent bytes nobody asked for).
  //
  // Malformed framing (bad status line, bad Content-Length, bad chunk line, oversized headers)
  // is a FAILED exception that says what was wrong. It is recorded (getFailure()) rather than
  // thrown, so that the bytes before the error can still be passed on: the consumer sees the
  // error where it is, e.g. in the body rather than while reading the head.

public:
  struct Limits {
    size_t maxHeaderBytes = 64 * 1024;
    // Largest header block (status line + headers) accepted, per response, 1xx ones included.
    // At most 120 KiB, whatever is set: kj-http 0.9.2 reads no larger one.
    size_t maxChunkLineBytes = 4096;
    // Longest chunk-size line (with extensions) or trailer section line accepted.
    size_t maxTrailerBytes = 64 * 1024;
    // Largest trailer section accepted.
    size_t maxInterimResponses = 1000;
    // Most interim (1xx) responses accepted before the final one, so that a server cannot keep
    // a request waiting forever with them.
  };

  explicit ResponseFramer(Limits limits);
  ResponseFramer(): ResponseFramer(Limits()) {}
  KJ_DISALLOW_COPY(ResponseFramer);

  void start(kj::HttpMethod method, bool connectionCarriedResponses = false);
  // Begins framing the response to a request made with `method` (a HEAD response has no body).
  // Requires no bytes to be buffered: a new exchange starts on a clean connection. Whether the
  // connection carried responses before only changes what an error says when the answer does not
  // begin with a status line: left over from an earlier response, rather than not HTTP at all.

  kj::ArrayPtr<kj::byte> space();
  // Where to read the next bytes from the connection into; never empty. Valid until the next call
  // to any other method. Throws if a header block would exceed Limits::maxHeaderBytes.

  void received(size_t n);
  // `n` bytes were written at the start of space(). Parses them.

  void receivedEof();
  // The connection ended. Completes a body delimited by the end of the connection; otherwise the
  // response is truncated, which is a failure.

  kj::Maybe<const kj::Exception&> getFailure() const { return failure; }
  // Why the response is malformed (or truncated), once that is known. Nothing after the point of
  // failure is ever passed on.

  void fail(kj::Exception&& e);
  // The owner lost track of what the connection delivered (a read it started was cancelled after
  // it may have taken bytes): the response fails with `e`, unless it failed already.

  size_t take(kj::ArrayPtr<kj::byte> out);
  // Copies up to out.size() bytes that may be passed on, and returns how many.

  size_t available() const { return limit - begin; }

  size_t directReadLimit() const;
  // How many bytes the owner may read from the connection straight into the consumer's buffer,
  // bypassing this one: nonzero only while nothing is buffered and the parser is inside body data
  // (the rest of a Content-Length body or of a chunk, or a body that runs to the end).

  void receivedDirect(size_t n);
  // `n` (at most directReadLimit()) body bytes were read straight into the consumer's buffer.
  // Bytes take() would return right now.

  bool mayGrow() const;
  // Whether available() can still grow with more input (false once everything the consumer may
  // see of this response has arrived, e.g. while only chunked trailers remain).

  bool isComplete() const { return state == State::COMPLETE; }
  // The whole response, trailers and terminator included, has been received.

  bool isUpgrade() const { return headParsed && head.status == 101; }
  // The final response switched protocols (101). From the end of its head on, the framer passes
  // every byte through (the new protocol's), and the response never becomes complete.

  bool hasNoBody() const { return headParsed && head.noBody; }
  // The final response has no body at all (HEAD, 204, 304, Content-Length: 0).

  bool hasHead() const { return headParsed; }
  // Whether the final response's header block has been parsed.

  kj::Maybe<kj::String> findFieldKjRefuses() const;
  // For a parsed head still in the buffer (it is, until the consumer reads past it): the first
  // field line kj-http 0.9.2 refuses though the framer does not need to (a name with a control
  // character, a space or a separator; a NUL in a value), described for an error message; null if
  // there is none, or the head is gone. Only for explaining a failure: it scans the whole head.

  bool endsWithBody() const;
  // For a response whose head was parsed: nothing can follow the last byte of its body (no
  // chunked terminator or trailers), so a reader that saw the body end saw the response end.

  bool saidClose() const { return headParsed && head.connectionClose; }
  // The final response carried `Connection: close`.

  bool hasReceivedAny() const { return receivedAny; }
  // Whether any byte arrived since start().

  kj::Maybe<kj::StringPtr> whyNotReusable() const;
  // For a response whose head was parsed: why the connection must not carry another request after
  // it (`Connection: close`, HTTP/1.0 without keep-alive, body delimited by connection close,
  // upgrade, conflicting framing headers), or null if nothing in the response forbids reuse.

  size_t residueSize() const;
  // Bytes received past the end of a complete response (not counting bytes still to be take()n).

  void finish();
  // After a complete response whose passable bytes were all taken: drops the trailers and leaves
  // only the residue (if any) buffered, ready for start() once that is empty.

  kj::Array<kj::byte> takeAll();
  // Removes and returns every buffered byte not yet taken, trailers and residue included, and
  // resets the framer to pass-through: for an upgraded or released connection, whose later bytes
  // belong to whoever owns the stream now.

  void passThrough();
  // From now on every byte received is passed on as is (upgraded connection).

  size_t bufferCapacity() const { return buffer.size(); }

  void freeBuffer();
  // Releases the buffer's memory while nothing is buffered between responses (an idle connection
  // holds none); does nothing otherwise.

private:
  enum class State {
    IDLE,          // between responses
    HEAD,          // reading a header block
    NO_BODY,       // (transient) head parsed, response has no body
    LENGTH,        // body of known length: `remaining` bytes to go
    CHUNK_LINE,    // reading a chunk-size line
    CHUNK_DATA,    // `remaining` bytes of chunk data to go
    CHUNK_CRLF,    // expecting the CRLF after chunk data
    TRAILERS,      // after the last chunk: trailer lines until an empty line
    UNTIL_EOF,     // body delimited by the end of the connection
    PASS_THROUGH,  // upgraded or released: every byte is passed on
    COMPLETE,
  };

  struct Head {
    unsigned status = 0;
    bool http10 = false;
    bool connectionClose = false;
    bool keepAlive = false;
    bool conflictingFraming = false;
    bool transferEncoding = false;  // a (non-empty) Transfer-Encoding field, whatever its coding
    bool noBody = false;
  };

  Limits limits;
  kj::Array<kj::byte> buffer;
  size_t begin = 0;   // next byte take() returns
  size_t limit = 0;   // end of the bytes take() may return
  size_t parsed = 0;  // end of the bytes parsed
  size_t end = 0;     // end of the bytes received
  size_t messageEnd = 0;  // when COMPLETE: end of the response in the buffer
  size_t lineStart = 0;   // start of the header block / chunk line / trailer line being read
  size_t headStart = 0;   // the final head, once parsed: [headStart, headEnd) in the buffer, until
  size_t headEnd = 0;     // bytes are moved or received over it (then headEnd is 0)
  size_t gapAt = 0;       // bytes [gapAt, gapAt + gapSize) are removed (see keepOnly()), until
  size_t gapSize = 0;     // parse() returns
  size_t trailerBytes = 0;
  bool trailerFieldSeen = false;  // a field line came in the trailer section (a fold may follow)
  size_t interimResponses = 0;
  uint64_t remaining = 0;
  State state = State::IDLE;
  kj::HttpMethod method = kj::HttpMethod::GET;
  Head head;
  bool headParsed = false;
  bool carriedResponses = false;   // see start()
  bool statusLineStarted = false;  // the head began with "HTTP/1." (see startsLikeStatusLine())
  size_t leadingBlanks = 0;  // blanks known to begin the head, from lineStart (the same)
  bool receivedAny = false;
  kj::Maybe<kj::Exception> failure;

  void parse();
  void parseEof();
  bool startsLikeStatusLine();
  kj::ArrayPtr<const char> firstLineSoFar() const;
  kj::Exception notAStatusLine(kj::ArrayPtr<const char> line) const;
  bool parseHeaderBlock();
  void parseHead(kj::ArrayPtr<const char> block);
  void parseStatusLine(kj::ArrayPtr<const char> line);
  kj::ArrayPtr<const char> parseChunkLine(kj::ArrayPtr<const char> line);
  void keepOnly(size_t from, size_t size, size_t lineEnd);
  void closeGap();
  bool parseTrailerLine();
  void checkTrailerLimits(size_t lineBytes, size_t sectionBefore, bool counted);
  void compact();
};

}  // namespace sockfetch
