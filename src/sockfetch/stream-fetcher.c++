#include "stream-fetcher.h"

#include <sockfetch/framed-stream.h>
#include <sockfetch/kj-compat.h>

#include <kj/debug.h>
#include <sys/random.h>

namespace sockfetch {

namespace {

class SystemEntropySource final: public kj::EntropySource {
  // The operating system's randomness, for WebSocket handshake keys.
public:
  void generate(kj::ArrayPtr<kj::byte> buffer) override {
    size_t done = 0;
    while (done < buffer.size()) {
      ssize_t n;
      KJ_SYSCALL(n = getrandom(buffer.begin() + done, buffer.size() - done, 0));
      done += n;
    }
  }
};

class NoBody final: public kj::AsyncOutputStream {
  // The body stream of a request without one (a GET or HEAD without expectedBodySize, or with 0:
  // `declaredEmpty`).
public:
  explicit NoBody(bool declaredEmpty): declaredEmpty(declaredEmpty) {}

  kj::Promise<void> write(const void*, size_t size) override {
    if (size == 0) return kj::READY_NOW;
    if (declaredEmpty) {
      return KJ_EXCEPTION(FAILED, "the request body is longer than the declared 0 bytes; declare "
          "the right expectedBodySize");
    }
    return KJ_EXCEPTION(FAILED, "this request was made without a body (a GET or HEAD without "
        "expectedBodySize); pass expectedBodySize to send one");
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    for (auto& piece: pieces) {
      if (piece.size() > 0) return write(piece.begin(), piece.size());
    }
    return kj::READY_NOW;
  }
  kj::Promise<void> whenWriteDisconnected() override {
    return kj::NEVER_DONE;
  }

private:
  bool declaredEmpty;
};

}  // namespace

// =================================================================================================
// ResponseBody: wraps kj's response body; at its end completes the exchange. It lives inside its
// exchange (see Exchange::handOutBody()), which it keeps alive, and so the exchange's client, whose
// buffer holds the response's status text and headers.

class StreamFetcher::ResponseBody final: public kj::AsyncInputStream {
  // A call into the exchange that may end it (endResponse(), fail(), succeed()) may reach the
  // fetcher's observer, which may drop this body, and with it the exchange it lives in: nothing
  // of this body is touched after such a call.
public:
  ResponseBody(Exchange& exchange, kj::HttpClient::Response& response);
  ~ResponseBody() noexcept(false);
  KJ_DISALLOW_COPY(ResponseBody);

  void finishNow();
  // For a response without a body: it ends right away (and synchronously: the framer already
  // holds the complete response).

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override;
  kj::Maybe<uint64_t> tryGetLength() override;

private:
  Exchange& exchange;
  kj::Own<kj::AsyncInputStream> inner;  // points into the exchange's client
  kj::Maybe<kj::Exception> readFailure;
  bool atEnd = false;

  bool isEnd(size_t n, size_t minBytes);
  // A short read is the end; so is a fixed-length body with nothing left (a reader that asked
  // for exactly the remaining length will not ask again).
  void readFailed(const kj::Exception& e);
  void reachedEndNow();
  // reachedEnd() for a body whose end is the response's end (see tryRead()), without a promise.
  void setBodyBuffer(kj::ArrayPtr<kj::byte> buffer);
  // The connection moves on (and the exchange lets go of it) once the body is over.
  kj::Maybe<kj::Promise<void>> reachedEnd();
  // kj's body is done with the connection. Null when the exchange is over at once (the usual
  // case), else a promise for the rest of the response.
  bool endedAtOnce();
  // Drops kj's body (before the client it points into goes) and ends the exchange if nothing
  // more of the response needs to be read; false if something does.
};

// =================================================================================================
// Exchange: the guard. It owns the connection and the per-fetch kj::HttpClient for one exchange,
// and is shared (refcounted) by the request body, the response promise and the response body, so
// it lives exactly as long as any of them. Members are declared so that the client is destroyed
// before the stream it writes to, and the guards destroy kj's body streams (which point into the
// client) before they drop their reference.

class StreamFetcher::Exchange final: public kj::Refcounted {
public:
  enum class RequestBodyKind { NONE, FIXED, CHUNKED };

  Exchange(StreamFetcher& fetcher, kj::Own<FramedStream> streamParam,
      const kj::HttpHeaderTable& table, kj::HttpClientSettings settings)
      : fetcher(fetcher), stream(kj::mv(streamParam)), view(*stream),
        client(kj::newHttpClient(table, view, kj::mv(settings))) {}

  ~Exchange() noexcept(false) {
    responseOver = true;  // nobody can read it any more
    if (!done) {
      fail(CloseKind::ABANDONED,
          kj::str("the exchange was abandoned before its response body was read to the end"));
    } else {
      closeIfAbandoned();
    }
  }

  void fail(CloseKind kind, kj::String reason, kj::Maybe<kj::String> writeRefusal = nullptr) {
    // The connection must not be reused. The fetcher is told now; the connection is closed as soon
    // as its response can no longer be read (see endResponse()), and released when the last of
    // the request body, response promise and response body is dropped. Writes of this request's
    // body fail from now on, with `writeRefusal` if given (a whole message: what happened and what
    // to do), else with `reason`.
    if (done) return;
    done = true;
    upgraded = kind == CloseKind::UPGRADED;
    if (!upgraded) {
      KJ_IF_SOME(message, writeRefusal) {
        stream->refuseWrites(kj::mv(message));
      } else {
        stream->refuseWrites(kj::str("the connection was closed (", reason, "), so the rest of "
            "the request cannot be sent; send the request again if it must reach the server"));
      }
    }
    KJ_IF_SOME(f, fetcher) {
      bool wroteAny = stream->getWritesCompleted() > 0 || stream->getWritesInFlight() > 0;
      if (upgraded) fetcher = nullptr;  // the connection is the new protocol's: nothing to tell
      f.exchangeFailed(*this, kind, kj::mv(reason), stream->getFramer().hasReceivedAny(),
          wroteAny);
    }
    closeIfAbandoned();
  }

  void endResponse() {
    // The response can no longer be read: read to its end, dropped, cancelled or failed.
    responseOver = true;
    closeIfAbandoned();
  }

  void closeIfAbandoned() {
    // A failed exchange whose response can no longer be read will never use its connection again,
    // though a request body the caller keeps (its writes are refused since fail()) still holds
    // it: shut the socket down now, so that the server sees it go when the fetcher (and a pool)
    // stops counting it. (`stream` is still here after `done` only if the exchange failed, or
    // if its fetcher is gone.)
    if (!done || !responseOver || upgraded || stream.get() == nullptr) return;
    stream->shutdownNow();
    KJ_IF_SOME(f, fetcher) {
      fetcher = nullptr;
      f.exchangeClosed(*this);
    }
  }

  void succeed();
  // The response was read to its end and is complete: hands the connection back if the exchange
  // left it clean, fails otherwise.

  void detachFetcher() { fetcher = nullptr; }

  void failNotReusable(kj::StringPtr why) {
    auto& framer = stream->getFramer();
    auto kind = framer.isUpgrade() ? CloseKind::UPGRADED
        : framer.saidClose()       ? CloseKind::CONNECTION_CLOSE
                                   : CloseKind::NOT_REUSABLE;
    fail(kind, kj::str(why));
  }

  void failRequest(kj::StringPtr what, const kj::Exception& e) {
    // The request or handshake failed. If the connection was found lost before anything was
    // written, say so (and count it as such) rather than as a failed exchange.
    KJ_IF_SOME(loss, stream->getGateLoss()) {
      fail(loss.gotBytes ? CloseKind::UNSOLICITED_BYTES : CloseKind::PEER_CLOSED_IDLE,
          kj::str(loss.reason));
    } else {
      // (For later requests, this is the previous one; for this one's body, its own failure,
      // whose description says what to do.)
      fail(CloseKind::FAILED, kj::str(what, e.getDescription()), kj::str("this request failed, "
          "so the rest of its body cannot be sent: ", e.getDescription()));
    }
  }

  kj::Maybe<kj::String> whyRequestIncomplete();

  kj::Exception explain(kj::Exception&& e) {
    // kj-http refuses some heads the framer passes (it does not need to look at every field):
    // its error names neither the field nor the server. Said in the framer's words when a field
    // kj-http refuses is found; otherwise `e` as it is.
    if (stream.get() == nullptr) return kj::mv(e);
    KJ_IF_SOME(field, stream->getFramer().findFieldKjRefuses()) {
      return KJ_EXCEPTION(FAILED, kj::str("the server sent a malformed HTTP response (", field,
          "); the connection was dropped, check the upstream server"));
    }
    return kj::mv(e);
  }

  kj::Maybe<kj::Exception> writeRefusal() {
    // Why the connection takes no more writes (the exchange failed), if so.
    if (stream.get() == nullptr) return nullptr;
    return stream->writeRefusal();
  }

  kj::HttpClient::Response onResponse(kj::HttpClient::Response&& response);
  kj::Own<kj::AsyncInputStream> handOutBody(kj::HttpClient::Response& response);
  // Wraps the response's body in this exchange's ResponseBody, kept inside the exchange (one
  // allocation fewer than a body of its own): the body the caller gets keeps the exchange alive
  // until it is dropped.
  kj::HttpClient::WebSocketResponse onWebSocketResponse(
      kj::HttpClient::WebSocketResponse&& response);

  kj::Maybe<StreamFetcher&> fetcher;
  kj::Own<FramedStream> stream;
  FramedStream::ExchangeView view;  // the exchange's window on `stream`
  kj::Own<kj::HttpClient> client;  // points into `view`: declared after it. Once the exchange is
                                   // over, kept (detached) as long as the response body, since the
                                   // response's status text and headers live in its buffer.
  kj::Maybe<ResponseBody> responseBody;  // once handed out; points into `client`: declared after it
  kj::Own<Exchange> keptByBody;           // this exchange, while `responseBody` is handed out
  class BodyDisposer final: public kj::Disposer {
    // Disposes of a handed-out `responseBody`: ends it in place, then lets go of the exchange.
  public:
    explicit BodyDisposer(Exchange& exchange): exchange(exchange) {}
    void disposeImpl(void*) const override;
  private:
    Exchange& exchange;
  };
  BodyDisposer bodyDisposer{*this};
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> abortResponse;  // requests with a body only
  RequestBodyKind requestBodyKind = RequestBodyKind::NONE;
  uint64_t requestBodyExpected = 0;
  uint64_t requestBodyWritten = 0;
  unsigned requestWritesPending = 0;  // writes not finished: in progress, or cancelled
  kj::Maybe<kj::String> requestWriteFailure;  // why a write of the request body failed
  // (Kept here, not in the body stream, for the write's bookkeeping: see RequestBody::track().)
  bool requestBodyDropped = false;
  bool discardRequestBody = false;  // see succeed()
  kj::Canceler bodyWrites;  // the request body's writes in flight, for succeed() to end
  bool responded = false;
  bool responseOver = false;  // see endResponse()
  bool upgraded = false;      // the stream belongs to another protocol now: never closed here
  bool done = false;
};

// =================================================================================================
// RequestBody: wraps kj's request body stream to count what reached the connection.

class StreamFetcher::RequestBody final: public kj::AsyncOutputStream {
public:
  RequestBody(kj::Own<Exchange> exchangeParam, kj::Own<kj::AsyncOutputStream> inner)
      : exchange(kj::mv(exchangeParam)), inner(kj::mv(inner)) {}

  ~RequestBody() noexcept(false) {
    exchange->requestBodyDropped = true;
    KJ_IF_SOME(reason, whyUnfinishable()) {
      if (!exchange->done) {
        if (!exchange->responded) {
          // The server still waits for the rest, so no response is coming: fail it now.
          KJ_IF_SOME(abort, exchange->abortResponse) {
            KJ_IF_SOME(failure, exchange->requestWriteFailure) {
              // The caller did write: the connection failed the write.
              abort->reject(KJ_EXCEPTION(DISCONNECTED, kj::str("a write of the request body "
                  "failed (", failure, "), so the request was never sent in full; send it again "
                  "on a new connection if it is safe to repeat")));
            } else {
              abort->reject(KJ_EXCEPTION(FAILED, kj::str(reason, ", so the request was never "
                  "sent in full; finish every write of the body (for a fixed-length body, all "
                  "expectedBodySize bytes) before dropping the body stream")));
            }
          }
        }
        exchange->fail(CloseKind::ABANDONED, kj::mv(reason));
      }
    }
    // Dropping kj's body now writes the chunked terminator, or marks a short fixed-length body
    // (or a chunked one whose last write never finished) as aborted.
    inner = nullptr;
  }

  kj::Promise<void> write(const void* buffer, size_t size) override {
    if (exchange->discardRequestBody && exchange->requestWriteFailure == nullptr) {
      return kj::READY_NOW;
    }
    KJ_IF_SOME(e, refusal(size)) {
      return kj::mv(e);
    }
    return track(kj::evalNow([&]() { return inner->write(buffer, size); }), size);
  }

  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    if (exchange->discardRequestBody && exchange->requestWriteFailure == nullptr) {
      return kj::READY_NOW;
    }
    size_t size = 0;
    for (auto& piece: pieces) size += piece.size();
    KJ_IF_SOME(e, refusal(size)) {
      return kj::mv(e);
    }
    return track(kj::evalNow([&]() { return inner->write(pieces); }), size);
  }

  kj::Promise<void> whenWriteDisconnected() override {
    return inner->whenWriteDisconnected();
  }

private:
  kj::Own<Exchange> exchange;
  kj::Own<kj::AsyncOutputStream> inner;  // points into exchange->client: declared after it
  // Once the exchange is over, kj's body writes through a view that refuses them: with the reason
  // if the exchange failed (FramedStream::refuseWrites()), else "this exchange is over".
  uint64_t bytesTaken = 0;     // by writes started, finished or not

  kj::Promise<void> track(kj::Promise<void> write, size_t size) {
    // Counts the write once it ends, as soon as it ends: the response's end and the body's drop
    // read the counts whether or not (or when) the caller waits for the write, and the caller may
    // keep its promise longer than this stream, so the bookkeeping holds the exchange instead.
    bytesTaken += size;
    ++exchange->requestWritesPending;
    return exchange->bodyWrites.wrap(kj::mv(write)).then(
        [exchange = kj::addRef(*exchange), size]() mutable {
      --exchange->requestWritesPending;
      exchange->requestBodyWritten += size;
    }, [exchange = kj::addRef(*exchange)](kj::Exception&& e) mutable {
      --exchange->requestWritesPending;
      // A write in flight when the server answered is discarded (see Exchange::succeed()).
      if (exchange->discardRequestBody) return;
      if (exchange->requestWriteFailure == nullptr) {
        exchange->requestWriteFailure = kj::str(e.getDescription());
      }
      kj::throwFatalException(kj::mv(e));
    }).eagerlyEvaluate(nullptr);
  }

  kj::Maybe<kj::Exception> refusal(size_t size) {
    // Why these `size` bytes may not be written, if so. kj-http refuses every write after one
    // that failed, or past a fixed length, with an error about its own state: say what happened
    // instead.
    if (exchange->requestBodyKind == Exchange::RequestBodyKind::FIXED &&
        size > exchange->requestBodyExpected - kj::min(bytesTaken, exchange->requestBodyExpected)) {
      return KJ_EXCEPTION(FAILED, kj::str("the request body is longer than the declared ",
          exchange->requestBodyExpected, " bytes; declare the right expectedBodySize"));
    }
    KJ_IF_SOME(failed, exchange->writeRefusal()) {
      return kj::mv(failed);
    }
    KJ_IF_SOME(reason, exchange->requestWriteFailure) {
      return KJ_EXCEPTION(DISCONNECTED, kj::str("an earlier write of this request body failed (",
          reason, "), so the rest cannot follow it; send the request again if it must reach the "
          "server"));
    }
    return nullptr;
  }

  kj::Maybe<kj::String> whyUnfinishable() {
    // Why the request, its body dropped now, can never have been sent in full, if so.
    switch (exchange->requestBodyKind) {
      case Exchange::RequestBodyKind::NONE:
        break;
      case Exchange::RequestBodyKind::FIXED:
        if (exchange->requestBodyWritten < exchange->requestBodyExpected) {
          return kj::str("the request body was dropped after ", exchange->requestBodyWritten,
              " of its ", exchange->requestBodyExpected, " bytes were written");
        }
        break;
      case Exchange::RequestBodyKind::CHUNKED:
        // kj-http ends a chunked body when it is dropped, unless a write to it never finished
        // (cancelled, still in progress, or failed): then the end is never sent.
        if (exchange->requestWritesPending > 0) {
          return kj::str("the chunked request body was dropped while a write to it was "
              "unfinished");
        }
        if (exchange->requestWriteFailure != nullptr) {
          return kj::str("the chunked request body was dropped after a write to it failed");
        }
        break;
    }
    return nullptr;
  }
};

// =================================================================================================
// ResponseBody methods

StreamFetcher::ResponseBody::ResponseBody(Exchange& exchange, kj::HttpClient::Response& response)
    : exchange(exchange), inner(kj::mv(response.body)) {}

StreamFetcher::ResponseBody::~ResponseBody() noexcept(false) {
  exchange.endResponse();
  if (!atEnd) {
    exchange.fail(CloseKind::ABANDONED, kj::str("the response body was dropped before its end"));
  }
  inner = nullptr;  // before the client it points into
}

void StreamFetcher::ResponseBody::finishNow() {
  KJ_ASSERT(exchange.stream->getFramer().isComplete());
  KJ_ASSERT(endedAtOnce());
}

kj::Promise<size_t> StreamFetcher::ResponseBody::tryRead(
    void* buffer, size_t minBytes, size_t maxBytes) {
  if (atEnd) return size_t(0);
  KJ_IF_SOME(failure, readFailure) {
    return cloneException(failure);
  }
  // A read of nothing reads nothing (kj-http 0.9.2's body readers take it for the connection
  // ending early, which would fail a sound exchange).
  if (maxBytes == 0) return size_t(0);
  if (inner.get() == nullptr) {
    // kj's body ended (the caller has all of it), but the read that waited for the rest of the
    // response (chunked trailers, the final CRLF) was cancelled, and bytes it had read may be
    // lost with it: where the response ends is no longer known, so the connection goes.
    atEnd = true;
    exchange.endResponse();
    exchange.fail(CloseKind::ABANDONED, kj::str("a read waiting for the end of the response was "
        "cancelled"));
    return size_t(0);
  }
  setBodyBuffer(kj::arrayPtr(reinterpret_cast<kj::byte*>(buffer), maxBytes));
  auto read = inner->tryRead(buffer, minBytes, maxBytes);
  if (exchange.done || exchange.stream->getFramer().endsWithBody()) {
    // The usual case: when kj's body ends, the framer has seen the whole response, so the end
    // completes the exchange at once, and the read needs no promise of its own for it.
    return read.then([this, minBytes](size_t n) -> size_t {
      setBodyBuffer(nullptr);
      if (isEnd(n, minBytes)) reachedEndNow();
      return n;
    }, [this](kj::Exception&& e) -> size_t {
      readFailed(e);
      kj::throwFatalException(kj::mv(e));
    });
  }
  // Chunked: kj's body ends at the last chunk's size line; the trailers and the final CRLF may
  // still be on their way, and the end is reported only once they have arrived.
  return read.then([this, minBytes](size_t n) -> kj::Promise<size_t> {
    setBodyBuffer(nullptr);
    if (!isEnd(n, minBytes)) return n;
    auto rest = reachedEnd();
    KJ_IF_SOME(promise, rest) {
      return promise.then([n]() { return n; });
    }
    return n;
  }, [this](kj::Exception&& e) -> kj::Promise<size_t> {
    readFailed(e);
    return kj::mv(e);
  });
  // A cancelled read leaves the body buffer set: harmless, as kj-http's own reads never go into
  // the consumer's buffer, and the next read or exchange replaces it.
}

kj::Maybe<uint64_t> StreamFetcher::ResponseBody::tryGetLength() {
  if (atEnd) return uint64_t(0);
  if (inner.get() == nullptr) return nullptr;
  return inner->tryGetLength();
}

bool StreamFetcher::ResponseBody::isEnd(size_t n, size_t minBytes) {
  if (n < minBytes) return true;
  KJ_IF_SOME(left, inner->tryGetLength()) {
    return left == 0;
  }
  return false;
}

void StreamFetcher::ResponseBody::readFailed(const kj::Exception& e) {
  setBodyBuffer(nullptr);
  // (Before endResponse(), which may let go of the stream.)
  bool cancelled = exchange.stream.get() != nullptr && exchange.stream->readWasCancelled();
  exchange.endResponse();
  if (cancelled) {
    exchange.fail(CloseKind::ABANDONED, kj::str(e.getDescription()));  // it says so
  } else {
    exchange.fail(CloseKind::FAILED,
        kj::str("reading the previous response body failed: ", e.getDescription()));
  }
}

void StreamFetcher::ResponseBody::reachedEndNow() {
  if (endedAtOnce()) return;
  KJ_IF_SOME(failure, exchange.stream->getFramer().getFailure()) {
    auto e = cloneException(failure);
    readFailure = cloneException(e);
    exchange.endResponse();
    exchange.fail(CloseKind::FAILED,
        kj::str("the previous response was malformed: ", e.getDescription()));
    kj::throwFatalException(kj::mv(e));
  }
  // kj-http saw the end of the body before the framer did: the two disagree about where this
  // response ends, so the connection must not carry another request.
  atEnd = true;
  exchange.endResponse();
  exchange.failNotReusable(
      "kj-http and the framer disagreed about where the response body ends");
}

void StreamFetcher::ResponseBody::setBodyBuffer(kj::ArrayPtr<kj::byte> buffer) {
  if (exchange.stream.get() != nullptr) exchange.stream->setBodyBuffer(buffer);
}

kj::Maybe<kj::Promise<void>> StreamFetcher::ResponseBody::reachedEnd() {
  if (endedAtOnce()) return nullptr;
  return exchange.stream->finishResponse().then([this]() {
    atEnd = true;
    exchange.succeed();
  }, [this](kj::Exception&& e) {
    readFailure = cloneException(e);
    exchange.endResponse();
    exchange.fail(CloseKind::FAILED,
        kj::str("the previous response was malformed: ", e.getDescription()));
    kj::throwFatalException(kj::mv(e));
  });
}

bool StreamFetcher::ResponseBody::endedAtOnce() {
  inner = nullptr;
  if (exchange.done) {
    // Already failed (or upgraded): nothing more to finish.
    atEnd = true;
    exchange.endResponse();
    return true;
  }
  auto& framer = exchange.stream->getFramer();
  if (framer.isComplete()) {
    atEnd = true;
    exchange.succeed();
    return true;
  }
  if (framer.getFailure() == nullptr) {
    KJ_IF_SOME(why, framer.whyNotReusable()) {
      // kj-http saw the end of the body before the framer did (they read the head differently,
      // or the body is delimited by the connection closing): the connection cannot be reused
      // anyway, so do not wait for the rest.
      atEnd = true;
      exchange.endResponse();
      exchange.failNotReusable(why);
      return true;
    }
  }
  return false;
}


// =================================================================================================
// AwaitingResponse: holds the exchange as long as its response promise exists. It lives in that
// promise's error handler (so it costs no promise node of its own), which is destroyed when the
// promise completes or is dropped: dropped before the response arrived, the exchange is abandoned.

class StreamFetcher::AwaitingResponse {
public:
  AwaitingResponse(kj::Own<Exchange> exchange, kj::StringPtr whatCancelled)
      : exchange(kj::mv(exchange)), whatCancelled(whatCancelled) {}
  AwaitingResponse(AwaitingResponse&&) = default;
  ~AwaitingResponse() noexcept(false) {
    if (exchange.get() != nullptr && !exchange->responded) {
      exchange->endResponse();
      exchange->fail(CloseKind::ABANDONED, kj::str(whatCancelled));
    }
  }

  Exchange& operator*() { return *exchange; }
  Exchange* operator->() { return exchange.get(); }

private:
  kj::Own<Exchange> exchange;
  kj::StringPtr whatCancelled;
};

// =================================================================================================
// IdleWatch: hears about the idle connection being lost, and logs failures of deferred drops.

class StreamFetcher::IdleWatch final: public FramedStream::IdleListener,
                                      public kj::TaskSet::ErrorHandler {
public:
  explicit IdleWatch(StreamFetcher& fetcher): fetcher(fetcher) {}

  void idleConnectionLost(bool gotBytes, kj::String reason) override {
    fetcher.closeIdle(gotBytes ? CloseKind::UNSOLICITED_BYTES : CloseKind::PEER_CLOSED_IDLE,
        kj::mv(reason));
  }

  void taskFailed(kj::Exception&& exception) override {
    KJ_LOG(ERROR, "closing a dropped connection failed", exception);
  }

private:
  StreamFetcher& fetcher;
};

// =================================================================================================
// Exchange methods

kj::Maybe<kj::String> StreamFetcher::Exchange::whyRequestIncomplete() {
  if (stream->getWritesInFlight() > 0) {
    return kj::str("the response ended while part of the request was still being written");
  }
  if (stream->getWritesCompleted() == 0) {
    return kj::str("the response ended before the request was written");
  }
  switch (requestBodyKind) {
    case RequestBodyKind::NONE:
      break;
    case RequestBodyKind::FIXED:
      if (requestBodyWritten < requestBodyExpected) {
        return kj::str("the response ended after only ", requestBodyWritten, " of the ",
            requestBodyExpected, " request body bytes were written");
      }
      break;
    case RequestBodyKind::CHUNKED:
      if (!requestBodyDropped) {
        return kj::str("the response ended before the chunked request body was finished (drop "
            "the request body stream once it is written)");
      }
      if (!stream->sawChunkedTerminator()) {
        return kj::str("the response ended before the chunked request body's terminator was "
            "written");
      }
      break;
  }
  return nullptr;
}

void StreamFetcher::Exchange::succeed() {
  endResponse();
  if (done) return;
  auto& framer = stream->getFramer();
  auto incomplete = whyRequestIncomplete();
  if (incomplete != nullptr && !framer.isUpgrade()) {
    // The server answered before the whole request reached it. The connection is not reused
    // (the server may still wait for the rest, or take it for a request), and from now on the
    // rest of the request body is taken and dropped, as the server itself must do (RFC 9112 9.3),
    // writes in flight included: a caller that goes on writing it (kj::newHttpService() pumping
    // a client's upload to the answered request) then ends its exchange normally, instead of
    // failing its client's. So too when the answer also ends reuse (`Connection: close`).
    discardRequestBody = true;
    bodyWrites.cancel("the server answered before the request body was written");
  }
  KJ_IF_SOME(why, framer.whyNotReusable()) {
    return failNotReusable(why);
  }
  KJ_IF_SOME(why, incomplete) {
    return fail(CloseKind::REQUEST_INCOMPLETE, kj::mv(why));
  }
  framer.finish();
  if (framer.residueSize() > 0) {
    return fail(CloseKind::UNSOLICITED_BYTES, kj::str("the server sent ", framer.residueSize(),
        " bytes after the end of the response, so the connection was dropped as poisoned"));
  }
  done = true;  // the client stays: the response body (our caller) keeps this exchange
  KJ_IF_SOME(f, fetcher) {
    fetcher = nullptr;
    f.exchangeSucceeded(kj::mv(stream));
  } else {
    // The fetcher (or its pool) was destroyed during the exchange: nobody takes the connection
    // back, so the server sees it closed now, not when the caller drops the body.
    stream->shutdownNow();
  }
}

kj::HttpClient::Response StreamFetcher::Exchange::onResponse(kj::HttpClient::Response&& response) {
  responded = true;
  auto& framer = stream->getFramer();
  auto body = handOutBody(response);
  if (framer.isUpgrade()) {
    fail(CloseKind::UPGRADED, kj::str("the connection was upgraded to another protocol"));
  } else if (framer.hasNoBody()) {
    // No body (HEAD, 204, 304, Content-Length: 0): the exchange is over now.
    KJ_ASSERT_NONNULL(responseBody).finishNow();
  }
  response.body = kj::mv(body);
  return kj::mv(response);
}

kj::Own<kj::AsyncInputStream> StreamFetcher::Exchange::handOutBody(
    kj::HttpClient::Response& response) {
  KJ_REQUIRE(responseBody == nullptr, "an exchange has one response body");
  auto& body = responseBody.emplace(*this, response);
  keptByBody = kj::addRef(*this);
  return kj::Own<kj::AsyncInputStream>(&body, bodyDisposer);
}

void StreamFetcher::Exchange::BodyDisposer::disposeImpl(void*) const {
  auto last = kj::mv(exchange.keptByBody);  // may destroy the exchange as it goes: last
  exchange.responseBody = nullptr;
}

kj::HttpClient::WebSocketResponse StreamFetcher::Exchange::onWebSocketResponse(
    kj::HttpClient::WebSocketResponse&& response) {
  responded = true;
  KJ_SWITCH_ONEOF(response.webSocketOrBody) {
    KJ_CASE_ONEOF(webSocket, kj::Own<kj::WebSocket>) {
      // The WebSocket now owns the connection (through this exchange, which it keeps alive).
      fail(CloseKind::UPGRADED, kj::str("the connection was upgraded to a WebSocket"));
      auto headers = kj::heap(response.headers->clone());
      response.headers = headers.get();
      response.webSocketOrBody = webSocket.attach(kj::addRef(*this), kj::mv(headers));
      return kj::mv(response);
    }
    KJ_CASE_ONEOF(body, kj::Own<kj::AsyncInputStream>) {
      kj::HttpClient::Response plain;
      plain.statusCode = response.statusCode;
      plain.statusText = response.statusText;
      plain.headers = response.headers;
      plain.body = kj::mv(body);
      auto wrapped = onResponse(kj::mv(plain));
      response.statusText = wrapped.statusText;
      response.headers = wrapped.headers;
      response.webSocketOrBody = kj::mv(wrapped.body);
      return kj::mv(response);
    }
  }
  KJ_UNREACHABLE;
}

// =================================================================================================
// StreamFetcher

StreamFetcher::StreamFetcher(kj::Own<kj::AsyncIoStream> stream, const kj::HttpHeaderTable& table,
    Settings settings)
    : table(table), settings(kj::mv(settings)), idleWatch(kj::heap<IdleWatch>(*this)),
      disposal(*idleWatch) {
  auto framed = kj::heap<FramedStream>(kj::mv(stream), this->settings.limits,
      this->settings.timer);
  streamCarriedExchange = framed->hasCarriedExchange();
  framed->watchIdle(*idleWatch);
  state.init<Idle>(Idle{kj::mv(framed)});
}

StreamFetcher::~StreamFetcher() noexcept(false) {
  KJ_IF_SOME(busy, state.tryGet<Busy>()) {
    // The exchange in flight finishes on its own; its connection is then closed.
    busy.exchange->detachFetcher();
  }
  KJ_IF_SOME(closed, state.tryGet<Closed>()) {
    if (closed.closing != nullptr) closed.closing->detachFetcher();  // it closes without us
  }
}

StreamFetcher::State StreamFetcher::getState() const {
  if (state.is<Idle>()) return State::IDLE;
  if (state.is<Busy>()) return State::BUSY;
  if (state.is<Closed>()) return State::CLOSED;
  return State::RELEASED;
}

kj::Maybe<kj::StringPtr> StreamFetcher::getCloseReason() const {
  KJ_IF_SOME(closed, state.tryGet<Closed>()) {
    return closed.reason.asPtr();
  }
  return nullptr;
}

kj::Own<StreamFetcher::Exchange> StreamFetcher::startExchange(kj::HttpMethod method) {
  KJ_SWITCH_ONEOF(state) {
    KJ_CASE_ONEOF(idle, Idle) {
      KJ_IF_SOME(loss, idle.stream->checkIdleNow()) {
        // Lost while idle, and nobody noticed yet: nothing is written.
        lastResponseBytes = false;
        lastRequestBytes = false;
        auto exception = refusal(loss.serverSpokeFirst, loss.reason);
        closeIdle(loss.gotBytes ? CloseKind::UNSOLICITED_BYTES : CloseKind::PEER_CLOSED_IDLE,
            kj::mv(loss.reason));
        kj::throwFatalException(kj::mv(exception));
      }
      auto stream = kj::mv(idle.stream);
      stream->beginExchange(method);
      kj::HttpClientSettings clientSettings;
      KJ_IF_SOME(entropy, settings.entropySource) {
        clientSettings.entropySource = entropy;
      } else {
        static SystemEntropySource systemEntropy;  // stateless: one for the process
        clientSettings.entropySource = systemEntropy;
      }
      auto exchange = kj::refcounted<Exchange>(*this, kj::mv(stream), table,
          kj::mv(clientSettings));
      state.init<Busy>(Busy{exchange.get()});
      return exchange;
    }
    KJ_CASE_ONEOF(busy, Busy) {
      kj::throwFatalException(KJ_EXCEPTION(FAILED,
          "StreamFetcher sends one request at a time on its connection, and a request is already "
          "in flight; read its response body to the end (or drop it) before the next request, or "
          "use a ConnectionPool for concurrent requests"));
    }
    KJ_CASE_ONEOF(closed, Closed) {
      kj::throwFatalException(refusal(serverSpokeFirst(), closed.reason));
    }
    KJ_CASE_ONEOF(released, Released) {
      kj::throwFatalException(KJ_EXCEPTION(FAILED,
          "this StreamFetcher's connection was given back by release(); make a new StreamFetcher "
          "over it to send more requests"));
    }
  }
  KJ_UNREACHABLE;
}

kj::Exception StreamFetcher::refusal(bool serverSpokeFirst, kj::StringPtr reason) {
  if (serverSpokeFirst) {
    // Most likely not an HTTP server (`reason` says to check the address): no advice to retry.
    return KJ_EXCEPTION(DISCONNECTED,
        kj::str("this StreamFetcher's connection was dropped because ", reason));
  }
  return KJ_EXCEPTION(DISCONNECTED, kj::str("this StreamFetcher's connection was dropped because ",
      reason, "; open a new connection (a ConnectionPool does this for you)"));
}

kj::HttpClient::Request StreamFetcher::request(kj::HttpMethod method, kj::StringPtr url,
    const kj::HttpHeaders& headers, kj::Maybe<uint64_t> expectedBodySize) {
  requireValidRequestTarget(url);
  requireValidHeaders(headers);
  auto exchange = startExchange(method);

  // Mirror kj-http's choice of request framing, to know when the request is fully written.
  bool isGet = method == kj::HttpMethod::GET || method == kj::HttpMethod::HEAD;
  KJ_IF_SOME(size, expectedBodySize) {
    if (isGet && size == 0) {
      exchange->requestBodyKind = Exchange::RequestBodyKind::NONE;
    } else {
      exchange->requestBodyKind = Exchange::RequestBodyKind::FIXED;
      exchange->requestBodyExpected = size;
    }
  } else if (isGet && headers.get(kj::HttpHeaderId::TRANSFER_ENCODING) == nullptr) {
    exchange->requestBodyKind = Exchange::RequestBodyKind::NONE;
  } else {
    exchange->requestBodyKind = Exchange::RequestBodyKind::CHUNKED;
  }

  auto inner = exchange->client->request(method, url, headers, expectedBodySize);
  kj::Own<kj::AsyncOutputStream> body;
  if (exchange->requestBodyKind == Exchange::RequestBodyKind::NONE) {
    // kj-http's stream for a request without a body only refuses writes, in kj's words.
    inner.body = nullptr;
    body = bodilessRequestBody(expectedBodySize);
  } else {
    body = kj::heap<RequestBody>(kj::addRef(*exchange), kj::mv(inner.body));
  }
  Exchange* ex = exchange.get();
  auto innerResponse = kj::mv(inner.response);
  if (exchange->requestBodyKind != Exchange::RequestBodyKind::NONE) {
    // A body dropped before the request was sent in full fails the response (see ~RequestBody).
    auto abort = kj::newPromiseAndFulfiller<void>();
    exchange->abortResponse = kj::mv(abort.fulfiller);
    innerResponse = innerResponse.exclusiveJoin(abort.promise.then([]() -> Response {
      KJ_FAIL_ASSERT("abortResponse is only ever rejected");
    }));
  }
  auto response = innerResponse.then([ex](Response&& response) {
    return ex->onResponse(kj::mv(response));
  }, [awaiting = AwaitingResponse(kj::mv(exchange),
          "a request was cancelled before its response arrived")](kj::Exception&& e) mutable
      -> Response {
    awaiting->endResponse();
    auto explained = awaiting->explain(kj::mv(e));
    awaiting->failRequest("the previous request failed: ", explained);
    kj::throwFatalException(kj::mv(explained));
  });
  return Request{kj::mv(body), kj::mv(response)};
}

namespace {

kj::Exception explainHandshake(kj::Exception&& e) {
  // kj-http 0.9.2 refuses a 101 whose Upgrade or Sec-WebSocket-Accept field is wrong in words
  // that name its own variable ("protocolError.description = Server failed WebSocket handshake:
  // incorrect Upgrade header: ..."): said here in ours, keeping its detail.
  static constexpr kj::StringPtr MARK = "Server failed WebSocket handshake: "_kj;
  auto found = strstr(e.getDescription().cStr(), MARK.cStr());
  if (found == nullptr) return kj::mv(e);
  auto detail = kj::StringPtr(found + MARK.size()).asArray();
  if (detail.size() > 0 && detail.back() == '.') detail = detail.slice(0, detail.size() - 1);
  return KJ_EXCEPTION(FAILED, kj::str("the server answered the WebSocket handshake with a 101 "
      "that does not accept it (", detail, "); the connection was dropped, check that the "
      "upstream serves WebSockets at this url"));
}

}  // namespace

kj::Promise<kj::HttpClient::WebSocketResponse> StreamFetcher::openWebSocket(
    kj::StringPtr url, const kj::HttpHeaders& headers) {
  requireValidRequestTarget(url);
  requireValidHeaders(headers);
  auto exchange = startExchange(kj::HttpMethod::GET);
  exchange->requestBodyKind = Exchange::RequestBodyKind::NONE;
  Exchange* ex = exchange.get();
  return ex->client->openWebSocket(url, headers).then([ex](WebSocketResponse&& response) {
    return ex->onWebSocketResponse(kj::mv(response));
  }, [awaiting = AwaitingResponse(kj::mv(exchange),
          "a WebSocket handshake was cancelled before its response arrived")](
          kj::Exception&& e) mutable -> WebSocketResponse {
    awaiting->endResponse();
    auto explained = explainHandshake(awaiting->explain(kj::mv(e)));
    awaiting->failRequest("the previous WebSocket handshake failed: ", explained);
    kj::throwFatalException(kj::mv(explained));
  });
}

kj::Own<kj::AsyncOutputStream> StreamFetcher::bodilessRequestBody(
    kj::Maybe<uint64_t> expectedBodySize) {
  // Stateless: each serves every request, on any thread.
  static NoBody undeclared(false);
  static NoBody declaredEmpty(true);
  auto& body = expectedBodySize == nullptr ? undeclared : declaredEmpty;
  return kj::Own<kj::AsyncOutputStream>(&body, kj::NullDisposer::instance);
}

kj::Own<kj::AsyncIoStream> StreamFetcher::release() {
  KJ_IF_SOME(idle, state.tryGet<Idle>()) {
    auto stream = kj::mv(idle.stream);
    stream->passThrough();
    state.init<Released>();
    return kj::mv(stream);
  }
  KJ_IF_SOME(closed, state.tryGet<Closed>()) {
    kj::throwFatalException(KJ_EXCEPTION(FAILED, kj::str("release(): there is no connection to "
        "give back, it was dropped because ", closed.reason)));
  }
  if (state.is<Released>()) {
    kj::throwFatalException(KJ_EXCEPTION(FAILED, "release() was already called: the connection "
        "is the caller's; make a new StreamFetcher over it to send more requests"));
  }
  kj::throwFatalException(KJ_EXCEPTION(FAILED, "release() needs an idle StreamFetcher; wait until "
      "the response body in flight has been read to its end"));
}

void StreamFetcher::exchangeSucceeded(kj::Own<FramedStream> stream) {
  KJ_ASSERT(state.is<Busy>());
  ++completedRequests;
  lastResponseBytes = true;
  lastRequestBytes = true;
  // Idle before anything else can throw: BUSY points at the exchange, which may go any time now.
  auto& idle = state.init<Idle>(Idle{kj::mv(stream)});
  idle.stream->watchIdle(*idleWatch);
  KJ_IF_SOME(o, observer) {
    o.fetcherIdle(*this);  // last: the observer may start the next request
  }
}

void StreamFetcher::exchangeFailed(Exchange& exchange, CloseKind kind, kj::String reason,
    bool receivedAny, bool wroteAny) {
  KJ_ASSERT(state.is<Busy>());
  lastResponseBytes = receivedAny;
  lastRequestBytes = wroteAny;
  bool upgraded = kind == CloseKind::UPGRADED;
  state.init<Closed>(Closed{kind, kj::mv(reason), upgraded ? nullptr : &exchange});
  if (upgraded) {
    KJ_IF_SOME(o, observer) {
      o.fetcherClosed(*this);
    }
  }
  // Otherwise the observer hears of it from exchangeClosed(), once the connection is closed: at
  // once if the response is over, else when it is.
}

void StreamFetcher::exchangeClosed(Exchange& exchange) {
  KJ_IF_SOME(closed, state.tryGet<Closed>()) {
    if (closed.closing == &exchange) {
      closed.closing = nullptr;
      KJ_IF_SOME(o, observer) {
        o.fetcherClosed(*this);
      }
    }
  }
}

void StreamFetcher::closeIdle(CloseKind kind, kj::String reason) {
  KJ_IF_SOME(idle, state.tryGet<Idle>()) {
    // Called from the idle read's continuation, which the stream owns: destroy it a little later.
    disposal.add(kj::evalLater([]() {}).attach(kj::mv(idle.stream)));
    state.init<Closed>(Closed{kind, kj::mv(reason)});
    KJ_IF_SOME(o, observer) {
      o.fetcherClosed(*this);
    }
  }
}

StreamFetcher::CloseKind StreamFetcher::getCloseKind() const {
  KJ_IF_SOME(closed, state.tryGet<Closed>()) {
    return closed.kind;
  }
  return CloseKind::NONE;
}

kj::StringPtr KJ_STRINGIFY(StreamFetcher::CloseKind kind) {
  switch (kind) {
    case StreamFetcher::CloseKind::NONE: return "none";
    case StreamFetcher::CloseKind::PEER_CLOSED_IDLE: return "peer_closed_idle";
    case StreamFetcher::CloseKind::UNSOLICITED_BYTES: return "unsolicited_bytes";
    case StreamFetcher::CloseKind::CONNECTION_CLOSE: return "connection_close";
    case StreamFetcher::CloseKind::NOT_REUSABLE: return "not_reusable";
    case StreamFetcher::CloseKind::UPGRADED: return "upgraded";
    case StreamFetcher::CloseKind::ABANDONED: return "abandoned";
    case StreamFetcher::CloseKind::REQUEST_INCOMPLETE: return "request_incomplete";
    case StreamFetcher::CloseKind::FAILED: return "failed";
  }
  KJ_UNREACHABLE;
}

kj::StringPtr KJ_STRINGIFY(StreamFetcher::State state) {
  switch (state) {
    case StreamFetcher::State::IDLE: return "idle";
    case StreamFetcher::State::BUSY: return "busy";
    case StreamFetcher::State::CLOSED: return "closed";
    case StreamFetcher::State::RELEASED: return "released";
  }
  KJ_UNREACHABLE;
}

}  // namespace sockfetch
