#pragma once

#include <sockfetch/response-framer.h>

#include <kj/async-io.h>
#include <kj/async.h>
#include <kj/compat/http.h>
#include <kj/one-of.h>

namespace sockfetch {

class FramedStream;

class StreamFetcher final: public kj::HttpClient {
  // An HTTP/1.1 client that owns one connection and reuses it safely, one request at a time.
  //
  // Each request() moves the connection into a guard that builds a kj::HttpClient for that one
  // exchange. The connection comes back (the fetcher is IDLE again) when the response body has
  // been read to its end and the exchange left the connection clean: the request was fully
  // written, the response fully framed (chunked trailers and terminator included), the server
  // allowed keep-alive (HTTP/1.1 without `Connection: close`, HTTP/1.0 only with
  // `Connection: keep-alive`), the body was not delimited by the connection closing, there was no
  // upgrade, and the server sent nothing past the end of the response. Otherwise the connection
  // is dropped and the fetcher is CLOSED with the reason.
  //
  // One request at a time: request() or openWebSocket() while a request is in flight throws
  // (message contains "one request at a time"); the exchange in flight is untouched and nothing
  // is written. Use a ConnectionPool for concurrent requests.
  //
  // While idle, the connection is watched: any byte the server sends (nobody asked for it) or the
  // server closing it drops the connection, with that reason, before a next request is written.
  // When the stream is kj's own socket stream, request() also asks the kernel directly (MSG_PEEK)
  // so that what the event loop has not reported yet is caught too. Any other stream (TLS, a
  // wrapper) is watched by a read that is always outstanding while idle, and a request on it
  // lets the event loop turn a few times before writing, so that whatever that read got is seen
  // (see Settings::timer for input the loop has not polled yet).
  // Interim 1xx responses are skipped (so `Expect: 100-continue` works), HEAD/204/304 responses
  // are bodiless, and a 101 response ends reuse (openWebSocket() works over the connection).
  //
  // A response body read that is cancelled (given up on: a timeout raced against it, say) makes
  // the body's next read fail and the connection is dropped: the cancelled read may already have
  // taken bytes from the connection (and kj-http's chunked reader keeps a partly read chunk-size
  // line only in that read), and no byte may be lost or taken for the wrong response. To bound
  // how long a body may take, drop the body. After a 101, the WebSocket's reads are kj's
  // own (a receive() may be given up on and called again).
  //
  // A body delimited by the connection closing ends where the stream reports its end. Over
  // kj-tls 0.9.2 that includes a TCP close without TLS close_notify, which anyone on the path can
  // forge: such a body may be cut short without an error (it is never reused). Bodies framed by
  // Content-Length or chunked encoding fail when cut. Prefer upstreams that frame their bodies.
  //
  // Lifetimes: the header table must outlive the fetcher and every response. A response's
  // headers and statusText stay valid until its body is dropped. Responses, bodies and promises
  // may outlive the fetcher and may be destroyed in any order; a response still in flight when
  // the fetcher is destroyed completes normally, and its connection is then closed.
  //
  // Single-threaded: use it on the event loop that owns the stream, and destroy it (with its
  // responses and bodies) before that event loop, like any KJ object bound to one.

public:
  struct Settings {
    kj::Maybe<kj::EntropySource&> entropySource;
    // Randomness for WebSocket keys in openWebSocket(); the operating system's if null.
    ResponseFramer::Limits limits;
    // Size limits applied to responses.
    kj::Maybe<kj::Timer&> timer;
    // The timer of the event loop the stream runs on (kj::AsyncIoProvider::getTimer(); a
    // ConnectionPool passes its own, which must be that one too). With it, a request on a stream
    // other than a plain socket (TLS, say) whose kernel already holds unread input waits for the
    // event loop to read it before writing, so that bytes the server sent while the connection
    // was idle are seen even if the loop had not polled since they came.
  };

  StreamFetcher(kj::Own<kj::AsyncIoStream> stream, const kj::HttpHeaderTable& table,
      Settings settings);
  StreamFetcher(kj::Own<kj::AsyncIoStream> stream, const kj::HttpHeaderTable& table)
      : StreamFetcher(kj::mv(stream), table, Settings()) {}
  // Takes ownership of a connected stream. The fetcher starts IDLE and watching it.

  ~StreamFetcher() noexcept(false);
  KJ_DISALLOW_COPY(StreamFetcher);

  Request request(kj::HttpMethod method, kj::StringPtr url, const kj::HttpHeaders& headers,
      kj::Maybe<uint64_t> expectedBodySize = nullptr) override;
  // Sends a request on the owned connection. Throws at once, writing nothing, if `url` is empty
  // or has a space or a control character, or a header has an empty name (FAILED; see
  // requireValidRequestTarget() and requireValidHeaders()), if a request is in flight (FAILED,
  // "one request at a time"), if the connection was dropped (DISCONNECTED, with the reason), or
  // if it was released (FAILED). `url` and `headers` need only remain valid until this returns;
  // `headers` must carry Host (neither this nor kj-http adds one).
  //
  // Failures later, of the response promise or a body read: DISCONNECTED when the connection
  // went away (closed or reset, before the response or in the middle of it; safe to send again
  // on a new connection if the request is idempotent, or if lastExchangeWroteRequest() is
  // false); FAILED when the response was malformed or over a limit, or the caller misused the
  // exchange (a read after a cancelled one, a write past the declared length); the message says
  // which.
  //
  // The request body, if any, must be written and then dropped; the connection is reused only if
  // the whole body reached it before the response body was read to its end. A body dropped before
  // the request was sent in full (fewer bytes than expectedBodySize, or a write to it unfinished or
  // failed) fails a response still awaited at once, and the connection is closed. After a write
  // failed, or the exchange did, every later write fails with the reason. A server may answer
  // before reading the body (without `Connection: close` it then reads and discards the rest);
  // if the caller reads that response to its end before writing the whole body, the connection
  // is closed, and the rest of the body is taken and discarded, never sent (the server may take
  // it for a request): writes to it succeed, so that a caller pumping it on (kj::newHttpService()
  // does, for its client's upload) ends its exchange normally.

  kj::Promise<WebSocketResponse> openWebSocket(
      kj::StringPtr url, const kj::HttpHeaders& headers) override;
  // Like request(), for a WebSocket handshake. On 101 the WebSocket owns the connection (bytes
  // the server sent right after the 101 are kept) and the fetcher is CLOSED ("upgraded"). Any
  // other response is handled like request()'s.

  enum class State {
    IDLE,      // holds the connection; request() may be called
    BUSY,      // a request is in flight
    CLOSED,    // the connection was dropped; getCloseReason() says why
    RELEASED,  // release() gave the connection back to the caller
  };

  State getState() const;
  kj::Maybe<kj::StringPtr> getCloseReason() const;
  // Why the connection was dropped, while CLOSED (valid as long as the fetcher).

  enum class CloseKind {
    NONE,                // not closed
    PEER_CLOSED_IDLE,    // the server closed the idle connection (or it failed while idle)
    UNSOLICITED_BYTES,   // bytes nobody asked for: while idle, or past the end of a response
    CONNECTION_CLOSE,    // the server sent `Connection: close`
    NOT_REUSABLE,        // HTTP/1.0 without keep-alive, body delimited by close, bad framing
    UPGRADED,            // 101: the connection now speaks another protocol
    ABANDONED,           // a body dropped early, a request or read cancelled
    REQUEST_INCOMPLETE,  // the response ended before the whole request was written
    FAILED,              // the request or response failed (I/O error, malformed response)
  };

  CloseKind getCloseKind() const;
  // The reason as a category, for counting (ConnectionPool's statistics).

  bool serverSpokeFirst() const {
    return getCloseKind() == CloseKind::UNSOLICITED_BYTES && completedRequests == 0 &&
        !lastRequestBytes && !streamCarriedExchange;
  }
  // Whether the connection was dropped because the server sent bytes before any request was
  // written on it, which an HTTP/1.1 server never does: the close reason then says to check the
  // upstream's address rather than to retry.

  bool lastExchangeReceivedResponse() const { return lastResponseBytes; }
  // Whether the last exchange received any byte of a response (meaningful once it ended: IDLE
  // or CLOSED). A request that failed on a reused connection before any response byte arrived
  // may be retried elsewhere.

  bool lastExchangeWroteRequest() const { return lastRequestBytes; }
  // Whether any byte of the last exchange's request reached the connection (meaningful once it
  // ended). A request that failed before that (the idle connection was found closed, or the
  // kernel refused its first write) is safe to retry, whatever it is.

  class Observer {
  public:
    virtual void fetcherIdle(StreamFetcher& fetcher) = 0;
    // The connection came back: the fetcher is IDLE and may take the next request (from here).
    virtual void fetcherClosed(StreamFetcher& fetcher) = 0;
    // The fetcher is CLOSED and its connection closed. A failed exchange whose response is still
    // being read (say, its request body was dropped short) keeps the connection until that
    // response is over: the fetcher is CLOSED at once, this is called then. Must not destroy the
    // fetcher synchronously; may drop response bodies (either callback may).
  };

  void setObserver(kj::Maybe<Observer&> observer) { this->observer = observer; }
  // Tells `observer` (which must outlive the fetcher, or be reset) about state changes.

  uint64_t getCompletedRequests() const { return completedRequests; }
  // Exchanges that finished cleanly and gave the connection back (the number of times it was
  // reused, plus one, once it has served a request).

  static kj::Own<kj::AsyncOutputStream> bodilessRequestBody(
      kj::Maybe<uint64_t> expectedBodySize = nullptr);
  // The body stream of a request made without one (a GET or HEAD without expectedBodySize, or
  // with 0): writing anything to it fails (FAILED), saying to pass the body's size (or, when it
  // was declared 0, that the body is longer than declared). Stateless and shared; ConnectionPool
  // hands it out too.

  kj::Own<kj::AsyncIoStream> release();
  // Gives the connection back while IDLE, with nothing lost: bytes already read from it come
  // first when reading the returned stream. The fetcher is then RELEASED. Throws FAILED if not
  // IDLE, saying why (busy, closed and why, or already released). The returned stream does not
  // depend on the fetcher.

private:
  class Exchange;
  class RequestBody;
  class ResponseBody;
  class IdleWatch;
  class AwaitingResponse;

  struct Idle {
    kj::Own<FramedStream> stream;
  };
  struct Busy {
    Exchange* exchange;  // cleared (by leaving BUSY) before the exchange is destroyed
  };
  struct Closed {
    CloseKind kind;
    kj::String reason;
    Exchange* closing = nullptr;  // a failed exchange still reading its response on the
                                  // connection; cleared (by exchangeClosed()) before it goes
  };
  struct Released {};

  const kj::HttpHeaderTable& table;
  Settings settings;
  uint64_t completedRequests = 0;
  bool streamCarriedExchange = false;  // the connection was released from another StreamFetcher
  bool lastResponseBytes = false;
  bool lastRequestBytes = false;
  kj::Maybe<Observer&> observer;
  kj::Own<IdleWatch> idleWatch;
  kj::TaskSet disposal;  // destroys dropped connections after the current event
  kj::OneOf<Idle, Busy, Closed, Released> state;

  kj::Own<Exchange> startExchange(kj::HttpMethod method);
  static kj::Exception refusal(bool serverSpokeFirst, kj::StringPtr reason);
  // What request() throws on a connection dropped for `reason`.
  void exchangeSucceeded(kj::Own<FramedStream> stream);
  void exchangeFailed(Exchange& exchange, CloseKind kind, kj::String reason, bool receivedAny,
      bool wroteAny);
  void exchangeClosed(Exchange& exchange);
  void closeIdle(CloseKind kind, kj::String reason);
};

kj::StringPtr KJ_STRINGIFY(StreamFetcher::State state);
kj::StringPtr KJ_STRINGIFY(StreamFetcher::CloseKind kind);

}  // namespace sockfetch
