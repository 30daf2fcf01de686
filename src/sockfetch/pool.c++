#include "pool.h"

#include <sockfetch/kj-compat.h>

#include <kj/debug.h>
#include <string.h>

namespace sockfetch {

namespace {

class LogErrors final: public kj::TaskSet::ErrorHandler {
public:
  void taskFailed(kj::Exception&& exception) override {
    KJ_LOG(ERROR, "ConnectionPool background task failed", exception);
  }
};

template <typename T>
struct ChainLink {
  // A T's place in a ConnectionPool::Chain<T>.
  T* older = nullptr;
  T* newer = nullptr;
  bool linked = false;
};

kj::Exception poolGoneBeforeSent(kj::StringPtr what, kj::StringPtr until) {
  // A request or handshake whose pool was destroyed before it could be sent on a connection.
  return KJ_EXCEPTION(DISCONNECTED, kj::str("the ConnectionPool was destroyed before this ", what,
      " could be sent; keep the pool alive until its ", until));
}

bool isIdempotent(kj::HttpMethod method) {
  switch (method) {
    case kj::HttpMethod::GET:
    case kj::HttpMethod::HEAD:
    case kj::HttpMethod::OPTIONS:
    case kj::HttpMethod::TRACE:
    case kj::HttpMethod::PUT:
    case kj::HttpMethod::DELETE:
      return true;
    default:
      return false;
  }
}

class RequestCopy {
  // A request's url and headers, copied (into the object itself if they are small, else into one
  // allocation): the caller's are valid only during request(), but the pool may send the request
  // later (it waited for a connection, or went elsewhere) or again (a retry). A kj::HttpHeaders
  // over the copy is built only then.
public:
  RequestCopy(kj::StringPtr url, const kj::HttpHeaders& headers) {
    // One pass over the headers when they fit in the object (the usual request), two when not.
    if (!copyInto(kj::arrayPtr(inlineText, sizeof(inlineText)), url, headers)) {
      largeText = kj::heapArray<char>(size);
      bool copied = copyInto(largeText, url, headers);
      KJ_ASSERT(copied);
    }
  }
  RequestCopy(RequestCopy&& other)
      : largeText(kj::mv(other.largeText)), size(other.size), urlSize(other.urlSize),
        headerCount(other.headerCount) {
    KJ_ASSERT(other.headers == nullptr, "a RequestCopy moves only before its headers are built");
    if (largeText.size() == 0) memcpy(inlineText, other.inlineText, size);
  }
  KJ_DISALLOW_COPY(RequestCopy);

  kj::StringPtr getUrl() { return kj::StringPtr(text(), urlSize); }

  const kj::HttpHeaders& getHeaders() {
    KJ_IF_SOME(h, headers) {
      return *h;
    }
    // A table of kj's built-in headers only (whose ids every table shares): every other header
    // stays unindexed, in the order forEach() gave it, so repeats, empty values and spelling are
    // kept and the copy is sent exactly as the original, whatever table the caller's headers use.
    static const kj::HttpHeaderTable builtInsOnly;
    auto h = kj::heap<kj::HttpHeaders>(builtInsOnly);
    const char* pos = text() + urlSize + 1;
    auto take = [&pos]() {
      kj::StringPtr s(pos, strlen(pos));
      pos += s.size() + 1;
      return s;
    };
    for (size_t i = 0; i < headerCount; i++) {
      auto name = take();
      h->add(name, take());
    }
    auto& result = *h;
    headers = kj::mv(h);
    return result;
  }

private:
  // The url, then each header's name and value, each NUL-terminated: in `inlineText` if they fit
  // (a typical request's few headers, kept without an allocation of their own), else in
  // `largeText`.
  char inlineText[256];
  kj::Array<char> largeText;
  size_t size = 0;
  size_t urlSize = 0;
  size_t headerCount = 0;
  kj::Maybe<kj::Own<kj::HttpHeaders>> headers;  // points into the text

  char* text() { return largeText.size() > 0 ? largeText.begin() : inlineText; }

  bool copyInto(kj::ArrayPtr<char> out, kj::StringPtr url, const kj::HttpHeaders& headers) {
    // Copies the url and headers into `out` if they fit; either way sets `size` (what they need)
    // and `headerCount`.
    char* pos = out.begin();
    size = 0;
    headerCount = 0;
    auto put = [&](kj::StringPtr s) {
      size += s.size() + 1;
      if (size <= out.size()) {
        memcpy(pos, s.cStr(), s.size() + 1);
        pos += s.size() + 1;
      }
    };
    put(url);
    headers.forEach([&](kj::StringPtr name, kj::StringPtr value) {
      put(name);
      put(value);
      ++headerCount;
    });
    urlSize = url.size();
    return size <= out.size();
  }
};

kj::Exception lostBeforeSent(kj::StringPtr reason, bool serverSpokeFirst,
    kj::StringPtr upstreamName) {
  // A new connection found lost before the request was written on it. (The pool sends such a
  // request once more itself, on another new connection; this is what it says if that fails
  // too. A connection lost after sitting idle in the pool is no failure: see
  // Connection::lostWhileIdle().)
  if (serverSpokeFirst) {
    // `reason` says to check the upstream's address: sending again would meet the same.
    return KJ_EXCEPTION(DISCONNECTED, kj::str("the pooled connection to the upstream",
        upstreamName, " was lost before the request was sent: ", reason));
  }
  // Sending again would most likely meet the same: the server is not keeping connections.
  return KJ_EXCEPTION(DISCONNECTED, kj::str("a new connection to the upstream", upstreamName,
      " was lost: ", reason, "; nothing of the request was written, check that the upstream "
      "accepts connections and keeps them open (it may be at its connection limit)"));
}

kj::String showDuration(kj::Duration d) {
  // "30 ms", as the pool's messages always said; kj's own form ("500μs") where that would round.
  if (d % kj::MILLISECONDS == 0 * kj::SECONDS) return kj::str(d / kj::MILLISECONDS, " ms");
  return kj::str(d);
}

enum class BodyMode { NONE, BUFFERED, STREAMING };

BodyMode bodyModeOf(kj::HttpMethod method, const kj::HttpHeaders& headers,
    kj::Maybe<uint64_t> expectedBodySize, size_t maxReplayBodyBytes) {
  // How the pool handles a request's body: none (kj-http sends none either), buffered until
  // complete (so that a retry can replay it), or streamed to the connection once it has one.
  bool isGet = method == kj::HttpMethod::GET || method == kj::HttpMethod::HEAD;
  KJ_IF_SOME(size, expectedBodySize) {
    if (isGet && size == 0) return BodyMode::NONE;
    return size <= maxReplayBodyBytes ? BodyMode::BUFFERED : BodyMode::STREAMING;
  }
  if (isGet && headers.get(kj::HttpHeaderId::TRANSFER_ENCODING) == nullptr) return BodyMode::NONE;
  return BodyMode::STREAMING;
}

bool mayRetry(const kj::Exception& e, bool replayable, bool idempotent, bool staleCandidate,
    bool wroteAny) {
  // Whether a failed request may be sent once more on a new connection: it failed for want of a
  // connection (DISCONNECTED), can be sent again (`replayable`), and either never reached the
  // connection or, idempotent, failed on a reused one before any response byte (the stale
  // keep-alive race).
  return e.getType() == kj::Exception::Type::DISCONNECTED && replayable &&
      (!wroteAny || (staleCandidate && idempotent));
}

kj::Exception lostBeforeSent(StreamFetcher& fetcher, kj::Exception&& e,
    kj::StringPtr upstreamName) {
  // A request that a pooled connection refused before writing anything, because the connection
  // was found lost: said in the pool's words (the fetcher advises opening a new connection, which
  // is what the pool does), unless the refusal was for another reason.
  if (e.getType() != kj::Exception::Type::DISCONNECTED) return kj::mv(e);
  KJ_IF_SOME(reason, fetcher.getCloseReason()) {
    return lostBeforeSent(reason, fetcher.serverSpokeFirst(), upstreamName);
  }
  return kj::mv(e);
}

}  // namespace

// =================================================================================================
// Life: shared with everything that may outlive the pool (requests in flight), to tell whether
// the pool still exists.

class ConnectionPool::Life final: public kj::Refcounted {
public:
  explicit Life(ConnectionPool& pool): pool(pool) {}
  kj::Maybe<ConnectionPool&> pool;
};

// =================================================================================================
// Chain

template <typename T>
void ConnectionPool::Chain<T>::add(T& item) {
  auto& link = item.chainLink;
  KJ_ASSERT(!link.linked);
  link.older = last;
  link.newer = nullptr;
  link.linked = true;
  if (last == nullptr) {
    first = &item;
  } else {
    last->chainLink.newer = &item;
  }
  last = &item;
  ++count;
}

template <typename T>
void ConnectionPool::Chain<T>::addOlderThan(T& newer, T& item) {
  auto& link = item.chainLink;
  KJ_ASSERT(!link.linked && newer.chainLink.linked);
  T* older = newer.chainLink.older;
  link.older = older;
  link.newer = &newer;
  link.linked = true;
  newer.chainLink.older = &item;
  if (older == nullptr) {
    first = &item;
  } else {
    older->chainLink.newer = &item;
  }
  ++count;
}

template <typename T>
void ConnectionPool::Chain<T>::remove(T& item) {
  auto& link = item.chainLink;
  KJ_ASSERT(link.linked);
  if (link.older == nullptr) {
    first = link.newer;
  } else {
    link.older->chainLink.newer = link.newer;
  }
  if (link.newer == nullptr) {
    last = link.older;
  } else {
    link.newer->chainLink.older = link.older;
  }
  link = ChainLink<T>();
  --count;
}

// =================================================================================================
// Connection: one pooled StreamFetcher. Refcounted: a request being sent holds a reference. The
// pool holds none (it only lists and links its connections); instead a connection holds one to
// itself while it is idle (dropped when it leaves the idle chain) and while its fetcher is busy
// (dropped when the fetcher reports idle or closed, or when the pool lets go of it).

class ConnectionPool::Connection final: public kj::Refcounted, public StreamFetcher::Observer {
public:
  Connection(ConnectionPool& pool, kj::Own<kj::AsyncIoStream> stream)
      : Connection(pool, kj::heap<StreamFetcher>(kj::mv(stream), pool.table,
                             pool.settings.fetcher), 0, pool.timer.now()) {}
  Connection(ConnectionPool& pool, kj::Own<StreamFetcher> fetcherToAdopt, uint64_t uses,
      kj::TimePoint idleSince)
      : pool(pool), fetcher(kj::mv(fetcherToAdopt)), uses(uses), idleSince(idleSince) {
    fetcher->setObserver(*this);
    allIndex = pool.all.size();
    pool.all.add(this);
  }

  ~Connection() noexcept(false) {
    KJ_IF_SOME(p, pool) {
      // Dropped while still in the pool's hands: a request gave up, or its wait timed out, after
      // it was handed this connection and before anything was sent on it. Its fetcher is then
      // as clean as when it was handed over, and goes back to the pool in a new Connection (this
      // one is going). Any other is closed, and counted.
      detach();
      if (fetcher->getState() == StreamFetcher::State::IDLE) {
        p.readopt(kj::mv(fetcher), uses, idleSince);
      } else {
        ++p.stats.droppedAbandoned;
        p.serveWaiters();
      }
    }
  }

  void detach() {
    // Leaves the pool: no longer counted, no more callbacks. A busy connection is then let go:
    // its exchange finishes without a fetcher, and closes the connection once over.
    auto leaving = kj::mv(busy);  // may destroy this connection on return: nothing follows
    KJ_IF_SOME(p, pool) {
      Connection* moved = p.all.back();
      p.all[allIndex] = moved;
      moved->allIndex = allIndex;
      p.all.removeLast();
      pool = nullptr;
      fetcher->setObserver(nullptr);
    }
  }

  // The fetcher's callbacks come from within it, so neither may destroy it: a connection that
  // nothing but its busy reference kept goes after this event.
  void fetcherIdle(StreamFetcher&) override {
    auto self = kj::mv(busy);  // idle now: the idle list or a waiter keeps it, if it stays
    KJ_IF_SOME(p, pool) {
      p.connectionIdle(*this);
      if (self.get() != nullptr && !self->isShared()) p.dispose(kj::mv(self));
    }
  }

  void fetcherClosed(StreamFetcher&) override {
    auto self = kj::mv(busy);
    KJ_IF_SOME(p, pool) {
      p.connectionClosed(*this);
      if (self.get() != nullptr) p.dispose(kj::mv(self));
    }
  }

  void countUse() {
    // A request went out on this connection: a reuse if it carried one before. While the fetcher
    // is busy with it, the connection keeps itself (its fetcher reports the end only later, from
    // the event loop; one that failed at once reports it later too, but is kept by the request's
    // own chain until then).
    KJ_IF_SOME(p, pool) {
      if (uses > 0) ++p.stats.reuses;
    }
    ++uses;
    if (fetcher->getState() == StreamFetcher::State::BUSY) busy = kj::addRef(*this);
  }

  bool lastUseWasStale() const {
    // After countUse(): the request was a reuse and failed before any response byte arrived
    // (the stale keep-alive race), so an idempotent one may be sent again.
    return uses > 1 && !fetcher->lastExchangeReceivedResponse();
  }

  bool lostWhileIdle(const kj::Exception& e, bool refusedAtOnce = false) const {
    // Whether a request handed this connection failed (`e`), nothing of it written, because the
    // connection, which had sat idle in the pool, was found closed (or sent bytes) while idle:
    // when the request started (the kernel or the idle read told: `refusedAtOnce`, the fetcher
    // refused it), or at its first write (the idle read told).
    // That is the usual end of a kept connection (the server closed it after a response, or its
    // idle timeout ran out, before the idle watch noticed), not a failed send: the request goes
    // on another connection, neither counted nor limited as a retry (each connection so lost
    // leaves the pool, and one handed over new is not covered, so this ends).
    return everIdle && lostBeforeWritten(e, refusedAtOnce);
  }

  bool lostBeforeWritten(const kj::Exception& e, bool refusedAtOnce = false) const {
    // As lostWhileIdle(), for any connection: a new one too (whose loss is then a failure, said
    // by lostBeforeSent()).
    auto kind = fetcher->getCloseKind();
    return e.getType() == kj::Exception::Type::DISCONNECTED &&
        (refusedAtOnce || !fetcher->lastExchangeWroteRequest()) &&
        (kind == StreamFetcher::CloseKind::PEER_CLOSED_IDLE ||
         kind == StreamFetcher::CloseKind::UNSOLICITED_BYTES);
  }

  kj::Maybe<ConnectionPool&> pool;
  kj::Own<StreamFetcher> fetcher;
  kj::Own<Connection> busy;  // itself, while its fetcher is busy (see above)
  uint64_t uses = 0;
  size_t allIndex = 0;       // where the pool lists it in `all`, while in the pool
  ChainLink<Connection> chainLink;  // in the pool's idle chain, while idle
  kj::Own<Connection> idleSelf;     // itself, while in the idle chain
  kj::TimePoint idleSince;   // when it was opened, or last came back from a request
  bool everIdle = false;     // came back to the pool at least once (see lostWhileIdle())
};

// =================================================================================================
// Waiter: a request waiting for a connection.

class ConnectionPool::Waiter {
public:
  Waiter(ConnectionPool& pool, bool fresh, kj::Own<kj::PromiseFulfiller<kj::Own<Connection>>> f)
      : pool(pool), fresh(fresh), fulfiller(kj::mv(f)) {
    pool.waiters.add(*this);
  }
  ~Waiter() noexcept(false) {
    unlink();
  }
  KJ_DISALLOW_COPY(Waiter);

  void unlink() {
    if (chainLink.linked) pool.waiters.remove(*this);
  }

  ConnectionPool& pool;
  bool fresh;
  struct Progress: public kj::Refcounted {
    bool connecting = false;  // a connection is being opened for the request (connectFor())
  };
  kj::Own<Progress> progress = kj::refcounted<Progress>();
  // Shared with the wait's timeout, which outlives the waiter: exclusiveJoin() drops the branch
  // that lost before the winner's continuation runs.
  kj::Own<kj::PromiseFulfiller<kj::Own<Connection>>> fulfiller;
  ChainLink<Waiter> chainLink;  // in the pool's waiters, until served or gone
};

// =================================================================================================
// Attempt: one request through the pool, shared by its body stream and its response chain.

class ConnectionPool::Attempt final: public kj::Refcounted {
public:
  Attempt(ConnectionPool& pool, kj::HttpMethod method, kj::StringPtr url,
      const kj::HttpHeaders& headers, kj::Maybe<uint64_t> expectedBodySize, BodyMode bodyMode)
      : life(kj::addRef(*pool.life)), method(method), copy(url, headers),
        expectedBodySize(expectedBodySize), bodyMode(bodyMode) {
    // `bodyMode`: bodyModeOf() the request, which the caller has already worked out.
    if (bodyMode == BodyMode::BUFFERED) expected = KJ_ASSERT_NONNULL(expectedBodySize);
    if (bodyMode == BodyMode::BUFFERED && expected > 0) {
      auto paf = kj::newPromiseAndFulfiller<void>();
      bodyBuffered = paf.promise.fork();
      bodyBufferedFulfiller = kj::mv(paf.fulfiller);
    }
  }

  bool bodyReady() {
    return bodyBufferedFulfiller.get() == nullptr;
  }

  kj::Promise<Response> run() {
    // Waits for a buffered body, takes a connection, sends.
    kj::Promise<void> ready = kj::READY_NOW;
    KJ_IF_SOME(buffered, bodyBuffered) {
      ready = buffered.addBranch();
    }
    return ready.then([this]() {
      auto& p = pool();
      return p.canceler.wrap(p.acquire(false));
    }).then([this](kj::Own<Connection>&& connection) { return sendLater(kj::mv(connection)); });
  }

  ConnectionPool& pool() {
    KJ_IF_SOME(p, life->pool) {
      return p;
    }
    kj::throwFatalException(poolGone());
  }

  static kj::Exception poolGone() {
    return poolGoneBeforeSent("request", "requests have their responses");
  }

  kj::Promise<Response> sendLater(kj::Own<Connection> connection) {
    auto& headers = copy.getHeaders();
    return send(kj::mv(connection), copy.getUrl(), headers);
  }

  kj::Promise<Response> sendElsewhere() {
    // On another connection, in place of one found lost before anything was written on it (see
    // Connection::lostWhileIdle()).
    auto& p = pool();
    return p.canceler.wrap(p.acquire(false)).then(
        [self = kj::addRef(*this)](kj::Own<Connection>&& connection) mutable {
      return self->sendLater(kj::mv(connection));
    });
  }

  kj::Promise<Response> send(kj::Own<Connection> connection, kj::StringPtr url,
      const kj::HttpHeaders& headers) {
    // `url` and `headers` need only be valid until this returns.
    if (life->pool == nullptr) {
      // The connection came in the turn the pool was destroyed, which detached it: the request
      // fails as one still waiting would, and the connection closes unused.
      return poolGone();
    }
    KJ_IF_SOME(e, unsendable()) {
      // (Already failed through `abandoned`, unless the connection came in the same turn.)
      return kj::mv(e);  // the connection, untouched, goes back to the pool
    }
    auto& fetcher = *connection->fetcher;
    // Below, a request refused before anything was written took nothing of a streaming body
    // either (it is handed to a connection only once the request is under way), so it may be
    // sent again whatever its body.
    kj::Maybe<Request> started;
    KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
      started = fetcher.request(method, url, headers, expectedBodySize);
    })) {
      // Found lost before anything was written (the server closed or poisoned it while idle, or
      // it was lost between being handed out and now), so another connection may carry it.
      if (connection->lostWhileIdle(e, true)) return sendElsewhere();
      return retryOrThrow(lostBeforeSent(fetcher, kj::mv(e), pool().upstreamName), false, false,
          true);
    }
    connection->countUse();
    auto request = kj::mv(KJ_ASSERT_NONNULL(started));
    switch (bodyMode) {
      case BodyMode::NONE:
        request.body = nullptr;
        break;
      case BodyMode::BUFFERED: {
        auto bytes = buffered.asPtr();
        auto write = writeAll(*request.body, bytes).attach(kj::mv(request.body));
        // A failed write also fails the response; nothing more to report here.
        bodyWrite = write.eagerlyEvaluate([](kj::Exception&&) {});
        break;
      }
      case BodyMode::STREAMING:
        if (streamingDropped) {
          request.body = nullptr;
        } else {
          innerBody = kj::mv(request.body);
          ++bodyGeneration;
          KJ_IF_SOME(waiter, innerBodyWaiter) {
            (waiter)->fulfill();
            innerBodyWaiter = nullptr;
          }
          bodyChanged();
        }
        break;
    }

    auto response = kj::mv(request.response);
    if (bodyMode == BodyMode::BUFFERED) {
      // A server may answer before reading the body. The write then goes on with the response
      // body (the fetcher discards what is left of it once the answer is read) rather than being
      // dropped with this attempt as the answer arrives, which would cut the request short and
      // count its connection as abandoned. The attempt goes with it: it holds the bytes the
      // write reads (and outlives the write: attachments go in order).
      response = response.then([self = kj::addRef(*this)](Response&& r) mutable {
        auto write = kj::mv(self->bodyWrite);
        r.body = r.body.attach(kj::mv(write), kj::mv(self));
        return kj::mv(r);
      });
    }
    return response.catch_(
        [self = kj::addRef(*this), connection = kj::mv(connection)](kj::Exception&& e) mutable
        -> kj::Promise<Response> {
      // Holds the attempt (see ConnectionPool::request()) for as long as sending it again (or
      // elsewhere) may need it.
      if (connection->lostWhileIdle(e) && self->takeBodyBack()) {
        self->pool().uncountUse(*connection);
        return self->sendElsewhere();
      }
      kj::Exception failure = self->life->pool == nullptr ? kj::mv(e)
          : KJ_ASSERT_NONNULL(self->life->pool).sayFailure(*connection, kj::mv(e));
      return self->retryOrThrow(kj::mv(failure), connection->lastUseWasStale(),
          connection->fetcher->lastExchangeWroteRequest());
    });
  }

  bool takeBodyBack() {
    // After the connection that took the request failed with nothing of it written: whether the
    // request may go on another connection as it is, its body (if streamed) taken back from the
    // failed one. Not once a write went to that one: its caller was told how it ended.
    if (bodyMode != BodyMode::STREAMING) return true;
    if (innerBodyWritten) return false;
    innerBody = nullptr;  // the failed exchange's, which nothing was written to
    bodyChanged();        // whenWriteDisconnected() follows the next connection
    return true;
  }

  kj::Promise<Response> retryOrThrow(kj::Exception&& e, bool staleCandidate, bool wroteAny,
      bool bodyUntouched = false) {
    // `staleCandidate`: failed on a reused connection before any response byte. The request is
    // sent again if it never reached the connection, or it is idempotent and replayable.
    // `bodyUntouched`: no connection took any of a streaming body, which can then be sent again.
    bool replayable = bodyMode != BodyMode::STREAMING || bodyUntouched;
    if (retried || !mayRetry(e, replayable, isIdempotent(method), staleCandidate, wroteAny)) {
      return kj::mv(e);
    }
    KJ_IF_SOME(p, life->pool) {
      retried = true;
      ++p.stats.retries;
      return p.canceler.wrap(p.acquire(true)).then(
          [self = kj::addRef(*this)](kj::Own<Connection>&& connection) mutable {
        return self->sendLater(kj::mv(connection));
      });
    }
    return kj::mv(e);  // the pool is gone: nowhere to retry
  }

  // Body handling, used by PendingBody.
  kj::Promise<void> write(kj::ArrayPtr<const kj::byte> bytes) {
    switch (bodyMode) {
      case BodyMode::NONE:
        break;
      case BodyMode::BUFFERED:
        return buffer(kj::arrayPtr(&bytes, 1));
      case BodyMode::STREAMING:
        return writeStreaming([bytes](kj::AsyncOutputStream& out) {
          return writeAll(out, bytes);
        });
    }
    KJ_FAIL_ASSERT("a request without a body is given bodilessRequestBody(), not a PendingBody");
  }

  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
    // A gathered write is one write: of a streaming body, one write of the connection's body (one
    // chunk of a chunked body, as kj-http would send it).
    switch (bodyMode) {
      case BodyMode::NONE:
        break;
      case BodyMode::BUFFERED:
        return buffer(pieces);
      case BodyMode::STREAMING:
        return writeStreaming([pieces](kj::AsyncOutputStream& out) { return out.write(pieces); });
    }
    KJ_FAIL_ASSERT("a request without a body is given bodilessRequestBody(), not a PendingBody");
  }

  kj::Promise<void> buffer(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
    // Keeps a write of a buffered body, refused whole if it is longer than declared (as kj-http
    // refuses it): no piece of it may complete the body.
    uint64_t size = 0;
    for (auto& piece: pieces) size += piece.size();
    if (size == 0) return kj::READY_NOW;
    if (buffered.size() + size > expected) {
      return KJ_EXCEPTION(FAILED, kj::str("the request body is longer than the declared ",
          expected, " bytes; declare the right expectedBodySize"));
    }
    for (auto& piece: pieces) buffered.addAll(piece);
    if (buffered.size() == expected) {
      bodyBufferedFulfiller->fulfill();
      bodyBufferedFulfiller = nullptr;
    }
    return kj::READY_NOW;
  }

  template <typename WriteTo>
  kj::Promise<void> writeStreaming(WriteTo writeTo) {
    // Writes through the connection's body once a connection took the request. A write that never
    // finishes (its promise dropped, or still in progress) leaves the body unfinishable, as
    // StreamFetcher's own body is: no later write may follow it, and dropping the body then fails
    // the request rather than ending the body as complete (see bodyDropped()).
    if (writeOutstanding) {
      return KJ_EXCEPTION(FAILED, "a write to this request body was given up on (its promise "
          "dropped) or has not finished, so no other may follow it; wait for each write to "
          "finish, and send the request again if one was given up on");
    }
    kj::Promise<void> written = nullptr;
    KJ_IF_SOME(inner, innerBody) {
      if (!innerBodyWritten) {
        innerBodyWritten = true;
        bodyChanged();
      }
      written = writeTo(*inner);
    } else KJ_IF_SOME(failure, bodyFailure) {
      return cloneException(failure);
    } else {
      auto paf = kj::newPromiseAndFulfiller<void>();
      innerBodyWaiter = kj::mv(paf.fulfiller);
      written = paf.promise.then([self = kj::addRef(*this), writeTo = kj::mv(writeTo)]() mutable
          -> kj::Promise<void> {
        KJ_IF_SOME(inner, self->innerBody) {
          if (!self->innerBodyWritten) {
            self->innerBodyWritten = true;
            self->bodyChanged();
          }
          return writeTo(*inner);
        }
        return KJ_EXCEPTION(FAILED, "the request body was dropped while a write to it waited for "
            "a connection; keep the body stream until its writes finish");
      });
    }
    writeOutstanding = true;
    // (The caller's promise keeps the attempt, in case the body stream is dropped before it. The
    // write counts as finished when it finishes, whether or not the caller waits for it yet.)
    return written.then([self = kj::addRef(*this)]() mutable { self->writeOutstanding = false; },
        [self = kj::addRef(*this)](kj::Exception&& e) mutable {
      self->writeOutstanding = false;  // (the connection's body says why, to any later write)
      kj::throwFatalException(kj::mv(e));
    }).eagerlyEvaluate(nullptr);
  }

  kj::Promise<void> whenWriteDisconnected() {
    // A streaming body's follows the connection that took it; before, it waits for one, and is
    // disconnected if none ever will. A buffered body's writes go to the pool, which never
    // disconnects.
    if (bodyMode != BodyMode::STREAMING) return kj::NEVER_DONE;
    KJ_IF_SOME(inner, innerBody) {
      return inner->whenWriteDisconnected().then(
          [self = kj::addRef(*this), generation = bodyGeneration]() mutable {
        return self->disconnectedUnlessResent(generation);
      });
    }
    if (bodyFailure != nullptr || streamingDropped) return kj::READY_NOW;
    return bodyChange().then([self = kj::addRef(*this)]() mutable {
      return self->whenWriteDisconnected();
    });
  }

  kj::Promise<void> disconnectedUnlessResent(uint64_t generation) {
    // The connection that took the body (the `generation`th to) is gone. If nothing was written
    // to it, the request may yet go on another (takeBodyBack()), which the response's outcome
    // decides: until then the body is not disconnected.
    if (generation != bodyGeneration || innerBody == nullptr) return whenWriteDisconnected();
    if (innerBodyWritten || bodyFailure != nullptr || streamingDropped || responded) {
      return kj::READY_NOW;
    }
    return bodyChange().then([self = kj::addRef(*this), generation]() mutable {
      return self->disconnectedUnlessResent(generation);
    });
  }

  kj::Promise<void> bodyChange() {
    // Fulfilled at the next bodyChanged().
    if (bodyTaken == nullptr) {
      auto paf = kj::newPromiseAndFulfiller<void>();
      bodyTaken = paf.promise.fork();
      bodyTakenFulfiller = kj::mv(paf.fulfiller);
    }
    return KJ_ASSERT_NONNULL(bodyTaken).addBranch();
  }

  void bodyChanged() {
    // A connection took the streaming body or gave it back, a write went to it, the response
    // came, or no connection ever will take it: wakes whenWriteDisconnected().
    KJ_IF_SOME(fulfiller, bodyTakenFulfiller) {
      fulfiller->fulfill();
    }
    bodyTakenFulfiller = nullptr;
    bodyTaken = nullptr;  // (its branches keep what they need)
  }

  void responseArrived() {
    responded = true;
    bodyChanged();
  }

  bool writeGivenUp() {
    // A write waited for a connection and its promise was dropped: its bytes are lost.
    KJ_IF_SOME(waiter, innerBodyWaiter) {
      return writeOutstanding && !waiter->isWaiting();
    }
    return false;
  }

  kj::Maybe<kj::Exception> unsendable() {
    // Why a streaming body that no connection took yet can never be sent in full, if so. (Its
    // writes wait for a connection: none of it was written.)
    if (bodyMode != BodyMode::STREAMING || innerBody != nullptr) return nullptr;
    if (writeGivenUp() && !streamingDropped) {
      return KJ_EXCEPTION(FAILED, "a write to the request body was given up on (its promise "
          "dropped) while it waited for a connection, so the request was not sent; send it "
          "again with its whole body");
    }
    if (!streamingDropped) return nullptr;
    if (writeOutstanding) {
      return KJ_EXCEPTION(FAILED, "the request body was dropped while a write to it was "
          "unfinished, so the request was not sent; finish every write of the body before "
          "dropping the body stream");
    }
    KJ_IF_SOME(size, expectedBodySize) {
      return KJ_EXCEPTION(FAILED, kj::str("the request body was dropped before any of its ", size,
          " bytes could be sent, so the request was not sent; write all expectedBodySize bytes "
          "before dropping the body stream"));
    }
    return nullptr;  // a chunked body that was never written to: an empty one
  }

  void bodyDropped() {
    switch (bodyMode) {
      case BodyMode::NONE:
        break;
      case BodyMode::BUFFERED:
        if (buffered.size() < expected && bodyBufferedFulfiller.get() != nullptr) {
          bodyBufferedFulfiller->reject(KJ_EXCEPTION(FAILED, kj::str("the request body was "
              "dropped after ", buffered.size(), " of its ", expected, " bytes, so nothing was "
              "sent; write all expectedBodySize bytes before dropping the body stream")));
        }
        break;
      case BodyMode::STREAMING:
        streamingDropped = true;
        // Once a connection took the body, a write given up on was the connection's body's own
        // (a waiting write's continuation runs as soon as the connection is handed over), so that
        // body knows it is unfinished. Before, nothing was sent: the request fails at once.
        if (innerBody == nullptr) {
          KJ_IF_SOME(e, unsendable()) {
            KJ_IF_SOME(fulfiller, abandoned) {
              fulfiller->reject(kj::mv(e));
            }
          }
        }
        innerBody = nullptr;  // finishes (chunked) or aborts (short or given up) the body
        bodyChanged();
        break;
    }
  }

  void failPendingWrites(const kj::Exception& e) {
    // No connection will carry the body: fail the write waiting for one, and every later one.
    if (bodyFailure == nullptr) bodyFailure = cloneException(e);
    KJ_IF_SOME(waiter, innerBodyWaiter) {
      (waiter)->reject(cloneException(e));
      innerBodyWaiter = nullptr;
    }
    bodyChanged();
  }

  kj::Own<Life> life;
  kj::HttpMethod method;
  RequestCopy copy;  // for a request sent after request() returned
  kj::Maybe<uint64_t> expectedBodySize;
  BodyMode bodyMode;
  uint64_t expected = 0;
  kj::Vector<kj::byte> buffered;
  kj::Maybe<kj::ForkedPromise<void>> bodyBuffered;        // while a buffered body is incomplete
  kj::Own<kj::PromiseFulfiller<void>> bodyBufferedFulfiller;
  kj::Maybe<kj::Own<kj::AsyncOutputStream>> innerBody;
  bool innerBodyWritten = false;  // a write went to innerBody (see takeBodyBack())
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> innerBodyWaiter;
  kj::Maybe<kj::Exception> bodyFailure;  // no connection will carry a streaming body
  kj::Maybe<kj::ForkedPromise<void>> bodyTaken;  // see bodyChange(), made on demand
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> bodyTakenFulfiller;
  uint64_t bodyGeneration = 0;  // how many connections took innerBody so far
  bool responded = false;       // a streaming request's response came
  kj::Promise<void> bodyWrite = nullptr;
  bool streamingDropped = false;
  bool writeOutstanding = false;  // a streaming write started and not finished (or given up)
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> abandoned;  // streaming: see request()
  bool retried = false;
};

// =================================================================================================
// WebSocketAttempt: one WebSocket handshake through the pool. A handshake is a GET without a
// body, so it is retried like one.

class ConnectionPool::WebSocketAttempt final: public kj::Refcounted {
public:
  WebSocketAttempt(ConnectionPool& pool, kj::StringPtr url, const kj::HttpHeaders& headers)
      : life(kj::addRef(*pool.life)), copy(url, headers) {}

  kj::Promise<WebSocketResponse> start(bool fresh) {
    KJ_IF_SOME(p, life->pool) {
      return p.canceler.wrap(p.acquire(fresh)).then([this](kj::Own<Connection>&& connection) {
        return on(kj::mv(connection));
      });
    }
    return webSocketPoolGone();
  }

private:
  kj::Own<Life> life;
  RequestCopy copy;
  bool retried = false;

  static kj::Exception webSocketPoolGone() {
    return poolGoneBeforeSent("WebSocket handshake", "handshakes are answered");
  }

  kj::Promise<WebSocketResponse> on(kj::Own<Connection> connection) {
    if (life->pool == nullptr) {
      // Came in the turn the pool was destroyed (see Attempt::send()).
      return webSocketPoolGone();
    }
    auto& fetcher = *connection->fetcher;
    kj::Maybe<kj::Promise<WebSocketResponse>> started;
    KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
      started = fetcher.openWebSocket(copy.getUrl(), copy.getHeaders());
    })) {
      // Lost while idle (or since it was handed out): nothing was written.
      if (connection->lostWhileIdle(e, true)) return start(false);
      auto& p = KJ_ASSERT_NONNULL(life->pool);  // (checked above)
      return retryOrThrow(lostBeforeSent(fetcher, kj::mv(e), p.upstreamName), false, false);
    }
    connection->countUse();
    auto forResult = kj::addRef(*connection);
    return KJ_ASSERT_NONNULL(kj::mv(started)).then(
        [connection = kj::mv(forResult)](WebSocketResponse&& response) mutable
        -> kj::Promise<WebSocketResponse> {
      // The WebSocket or body keeps the connection (and so its fetcher) alive.
      KJ_SWITCH_ONEOF(response.webSocketOrBody) {
        KJ_CASE_ONEOF(socket, kj::Own<kj::WebSocket>) {
          response.webSocketOrBody = socket.attach(kj::mv(connection));
        }
        KJ_CASE_ONEOF(body, kj::Own<kj::AsyncInputStream>) {
          response.webSocketOrBody = body.attach(kj::mv(connection));
        }
      }
      return kj::mv(response);
    }, [this, connection = kj::mv(connection)](kj::Exception&& e) mutable
        -> kj::Promise<WebSocketResponse> {
      KJ_IF_SOME(p, life->pool) {
        if (connection->lostWhileIdle(e)) {
          p.uncountUse(*connection);
          return start(false);
        }
        return retryOrThrow(p.sayFailure(*connection, kj::mv(e)), connection->lastUseWasStale(),
            connection->fetcher->lastExchangeWroteRequest());
      }
      return retryOrThrow(kj::mv(e), connection->lastUseWasStale(),
          connection->fetcher->lastExchangeWroteRequest());
    });
  }

  kj::Promise<WebSocketResponse> retryOrThrow(kj::Exception&& e, bool staleCandidate,
      bool wroteAny) {
    if (retried || !mayRetry(e, true, true, staleCandidate, wroteAny)) return kj::mv(e);
    KJ_IF_SOME(p, life->pool) {
      retried = true;
      ++p.stats.retries;
      return start(true);
    }
    return kj::mv(e);  // the pool is gone: nowhere to retry
  }
};

class ConnectionPool::PendingBody final: public kj::AsyncOutputStream {
  // The request body handed to the caller before a connection is chosen.
public:
  explicit PendingBody(kj::Own<Attempt> attempt): attempt(kj::mv(attempt)) {}
  ~PendingBody() noexcept(false) {
    attempt->bodyDropped();
  }

  kj::Promise<void> write(const void* buffer, size_t size) override {
    return attempt->write(kj::arrayPtr(reinterpret_cast<const kj::byte*>(buffer), size));
  }

  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return attempt->write(pieces);
  }

  kj::Promise<void> whenWriteDisconnected() override {
    return attempt->whenWriteDisconnected();
  }

private:
  kj::Own<Attempt> attempt;
};

// =================================================================================================
// ConnectionPool

ConnectionPool::ConnectionPool(kj::Timer& timer, const kj::HttpHeaderTable& table,
    Connector connector, Settings settings)
    : life(kj::refcounted<Life>(*this)), timer(timer), table(table),
      connector(kj::mv(connector)), settings(kj::mv(settings)),
      errorHandler(kj::heap<LogErrors>()), tasks(*errorHandler) {
  if (this->settings.upstreamName.size() > 0) {
    upstreamName = kj::str(" (", this->settings.upstreamName, ")");
  }
  this->settings.upstreamName = nullptr;  // the caller's string need not outlive the constructor
  KJ_REQUIRE(this->settings.maxConnections > 0, "ConnectionPool needs maxConnections >= 1");
  // A timeout too long to add to the clock's time (kj::maxValue, say, meant as "never") is cut
  // to a century: never, in practice, and no overflow.
  constexpr kj::Duration CENTURY = 100 * 365 * kj::DAYS;
  for (kj::Duration* timeout: {&this->settings.idleTimeout, &this->settings.waitTimeout,
           &this->settings.connectTimeout}) {
    KJ_REQUIRE(*timeout >= 0 * kj::SECONDS, "ConnectionPool's timeouts cannot be negative; use 0 "
        "for at once, kj::maxValue for never", *timeout / kj::MILLISECONDS);
    *timeout = kj::min(*timeout, CENTURY);
  }
  if (this->settings.fetcher.timer == nullptr) this->settings.fetcher.timer = timer;
}

ConnectionPool::ConnectionPool(kj::Timer& timer, const kj::HttpHeaderTable& table,
    kj::NetworkAddress& address, Settings settings)
    : ConnectionPool(timer, table, addressConnector(address), kj::mv(settings)) {
  if (upstreamName.size() == 0) upstreamName = kj::str(" (", address.toString(), ")");
}

ConnectionPool::~ConnectionPool() noexcept(false) {
  // Fails every request still waiting for a connection (those chains touch the pool), then lets
  // the requests already sent finish on their own.
  life->pool = nullptr;
  while (!all.empty()) all.back()->detach();
  canceler.cancel(KJ_EXCEPTION(DISCONNECTED,
      "the ConnectionPool was destroyed while this request was waiting for a connection; keep "
      "the pool alive until its requests have their responses"));
  while (!idle.empty()) removeIdle(idle.oldest());
}

kj::HttpClient::Request ConnectionPool::request(kj::HttpMethod method, kj::StringPtr url,
    const kj::HttpHeaders& headers, kj::Maybe<uint64_t> expectedBodySize) {
  requireValidRequestTarget(url);  // at once, as StreamFetcher would: nothing waits, or is sent
  requireValidHeaders(headers);
  ++stats.requests;
  auto bodyMode = bodyModeOf(method, headers, expectedBodySize, settings.maxReplayBodyBytes);
  if (bodyMode == BodyMode::NONE) {
    KJ_IF_SOME(connection, takeIdle()) {
      return sendBodilessNow(method, url, headers, expectedBodySize, kj::mv(connection));
    }
  }
  auto attempt = kj::refcounted<Attempt>(*this, method, url, headers, expectedBodySize,
      bodyMode);
  Attempt* raw = attempt.get();
  kj::Own<kj::AsyncOutputStream> body;
  if (raw->bodyMode == BodyMode::NONE) {
    body = StreamFetcher::bodilessRequestBody(expectedBodySize);
  } else {
    body = kj::heap<PendingBody>(kj::addRef(*attempt));
  }
  kj::Promise<Response> response = nullptr;
  bool sentNow = false;
  if (raw->bodyReady()) {
    KJ_IF_SOME(connection, takeIdle()) {
      // An idle connection is ready and the body need not be buffered first: send now with the
      // caller's headers.
      response = raw->send(kj::mv(connection), url, headers);
      sentNow = true;
    }
  }
  if (!sentNow) response = raw->run();
  if (raw->bodyMode == BodyMode::STREAMING) {
    // The body's writes wait for a connection, so the request must proceed whether or not the
    // caller awaits the response yet (eagerly), and a writer must hear that there will be no
    // connection, or that the request was given up. A body given up on before a connection
    // took it fails the request at once (Attempt::bodyDropped()).
    auto abandoned = kj::newPromiseAndFulfiller<void>();
    raw->abandoned = kj::mv(abandoned.fulfiller);
    response = response.exclusiveJoin(abandoned.promise.then([]() -> Response {
      KJ_FAIL_ASSERT("`abandoned` is only ever rejected");
    }));
    response = response.then([raw](Response&& r) -> Response {
      raw->responseArrived();
      return kj::mv(r);
    }, [raw](kj::Exception&& e) -> Response {
      raw->failPendingWrites(e);
      kj::throwFatalException(kj::mv(e));
    }).attach(kj::defer([raw]() {
      raw->failPendingWrites(KJ_EXCEPTION(DISCONNECTED,
          "the response promise was dropped before a connection carried the request body; keep "
          "the response promise until the body is written"));
    })).eagerlyEvaluate(nullptr);
  }
  return Request{kj::mv(body), response.attach(kj::mv(attempt))};
}

kj::HttpClient::Request ConnectionPool::sendBodilessNow(kj::HttpMethod method,
    kj::StringPtr url, const kj::HttpHeaders& headers, kj::Maybe<uint64_t> expectedBodySize,
    kj::Own<Connection> connection) {
  auto& fetcher = *connection->fetcher;
  kj::Maybe<Request> started;
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
    started = fetcher.request(method, url, headers, expectedBodySize);
  })) {
    // Found lost before anything was written (the server closed or poisoned it while idle): sent
    // on another connection if it had sat idle, else once more on a new one (a retry).
    auto attempt = kj::refcounted<Attempt>(*this, method, url, headers, expectedBodySize,
        BodyMode::NONE);
    auto response = connection->lostWhileIdle(e, true) ? attempt->sendElsewhere()
        : attempt->retryOrThrow(lostBeforeSent(fetcher, kj::mv(e), upstreamName), false, false,
              true);
    return Request{StreamFetcher::bodilessRequestBody(expectedBodySize),
        response.attach(kj::mv(attempt))};
  }
  connection->countUse();
  auto request = kj::mv(KJ_ASSERT_NONNULL(started));
  auto response = request.response.catch_(
      [life = kj::addRef(*life), method, expectedBodySize, copy = RequestCopy(url, headers),
       connection = kj::mv(connection)](kj::Exception&& e) mutable -> kj::Promise<Response> {
    // A bodiless request is replayable, so whether it may be sent again depends on how it failed
    // (see mayRetry()); an attempt to send it again is made only then.
    bool stale = connection->lastUseWasStale();
    bool wroteAny = connection->fetcher->lastExchangeWroteRequest();
    bool lostWhileIdle = connection->lostWhileIdle(e);
    if (!lostWhileIdle && !mayRetry(e, true, isIdempotent(method), stale, wroteAny)) {
      return kj::mv(e);
    }
    KJ_IF_SOME(pool, life->pool) {
      if (lostWhileIdle) pool.uncountUse(*connection);
      auto attempt = kj::refcounted<Attempt>(pool, method, copy.getUrl(), copy.getHeaders(),
          expectedBodySize, BodyMode::NONE);
      auto retry = lostWhileIdle ? attempt->sendElsewhere()
          : attempt->retryOrThrow(pool.sayFailure(*connection, kj::mv(e)), stale, wroteAny);
      return retry.attach(kj::mv(attempt));
    }
    return kj::mv(e);  // the pool is gone: nowhere to retry
  });
  return Request{StreamFetcher::bodilessRequestBody(expectedBodySize), kj::mv(response)};
}

kj::Maybe<kj::Own<ConnectionPool::Connection>> ConnectionPool::takeIdle() {
  auto now = timer.now();
  while (!idle.empty()) {
    if (idle.newest().idleSince + settings.idleTimeout <= now) {
      // Expired, and so is every older one, though the sweep has not run yet (its timer fires
      // later in this turn, or the clock has not moved since: idleTimeout 0). Never handed out.
      while (!idle.empty()) closeOldestIdle(&Stats::droppedIdleTimeout);
      return nullptr;
    }
    auto connection = removeIdle(idle.newest());
    if (connection->fetcher->getState() == StreamFetcher::State::IDLE) {
      return kj::mv(connection);
    }
    dispose(kj::mv(connection));
  }
  return nullptr;
}

kj::Promise<kj::HttpClient::WebSocketResponse> ConnectionPool::openWebSocket(
    kj::StringPtr url, const kj::HttpHeaders& headers) {
  requireValidRequestTarget(url);
  requireValidHeaders(headers);
  ++stats.requests;
  auto attempt = kj::refcounted<WebSocketAttempt>(*this, url, headers);
  auto promise = attempt->start(false);
  return promise.attach(kj::mv(attempt));
}

kj::Promise<kj::Own<ConnectionPool::Connection>> ConnectionPool::acquire(bool fresh) {
  if (!fresh) {
    KJ_IF_SOME(connection, takeIdle()) {
      return kj::mv(connection);
    }
  }
  if (getOpenCount() >= settings.maxConnections && fresh && !idle.empty()) {
    // Make room for the new connection a retry needs: close the least recently used idle one.
    closeOldestIdle(&Stats::droppedForRetry);
  }
  // Requests already waiting come first: a place freed a moment ago (a connect given up on frees
  // its place to them a turn later) is theirs, not this newcomer's.
  if (!waiters.empty()) serveWaiters();
  if (getOpenCount() < settings.maxConnections) return connect();

  if (waiters.size() >= settings.maxWaiting) {
    ++stats.overloaded;
    auto inUse = connecting == 0 ? kj::str("busy")
        : kj::str("busy or being opened (", connecting, " being opened)");
    return KJ_EXCEPTION(OVERLOADED, kj::str("the connection pool is saturated: all ",
        settings.maxConnections, " connections are ", inUse, " and ", waiters.size(),
        " requests are already waiting; raise maxConnections or maxWaiting, or send fewer "
        "requests at once"));
  }
  ++stats.waits;
  auto paf = kj::newPromiseAndFulfiller<kj::Own<Connection>>();
  auto waiter = kj::heap<Waiter>(*this, fresh, kj::mv(paf.fulfiller));
  auto timeout = timer.afterDelay(settings.waitTimeout)
      .then([this, progress = kj::addRef(*waiter->progress)]() -> kj::Own<Connection> {
    ++stats.overloaded;
    if (progress->connecting) {
      kj::throwFatalException(KJ_EXCEPTION(OVERLOADED, kj::str("waited ",
          showDuration(settings.waitTimeout), " for a connection to the upstream", upstreamName,
          " and got none: the one being opened for this request was not open yet; check that the "
          "upstream accepts connections promptly, or raise Settings::waitTimeout")));
    }
    kj::throwFatalException(KJ_EXCEPTION(OVERLOADED, kj::str("waited ",
        showDuration(settings.waitTimeout), " for a free connection to the upstream",
        upstreamName, " and got none; the upstream is slow or maxConnections is too low: raise "
        "Settings::waitTimeout or maxConnections, or send fewer requests at once")));
  });
  return paf.promise.attach(kj::mv(waiter)).exclusiveJoin(kj::mv(timeout));
}

class ConnectionPool::ConnectSlot {
  // Counts a connection being opened against maxConnections until the attempt ends, however.
public:
  explicit ConnectSlot(ConnectionPool& pool): pool(pool) {
    ++pool.connecting;
  }
  ~ConnectSlot() noexcept(false) {
    if (!held) return;
    release();
    // The attempt was cancelled (its request gave up) before it ended: the place it held may be
    // a waiting request's now. Served a turn later, not from within the cancellation; not at all
    // if the pool is being destroyed (it fails its waiters itself).
    if (pool.life->pool != nullptr) {
      pool.tasks.add(kj::evalLater([&pool = pool]() { pool.serveWaiters(); }));
    }
  }
  KJ_DISALLOW_COPY(ConnectSlot);
  void release() {
    if (held) {
      held = false;
      --pool.connecting;
    }
  }

private:
  ConnectionPool& pool;
  bool held = true;
};

kj::Promise<kj::Own<ConnectionPool::Connection>> ConnectionPool::connect() {
  auto slot = kj::heap<ConnectSlot>(*this);
  auto* s = slot.get();
  auto timeout = timer.afterDelay(settings.connectTimeout)
      .then([this]() -> kj::Own<kj::AsyncIoStream> {
    kj::throwFatalException(KJ_EXCEPTION(OVERLOADED, kj::str("connecting to the upstream",
        upstreamName, " timed out after ", showDuration(settings.connectTimeout), "; check that "
        "it is reachable, or raise Settings::connectTimeout")));
  });
  // A connector that throws instead of returning a failed promise fails this attempt all the same.
  return kj::evalNow([this]() { return connector(); }).exclusiveJoin(kj::mv(timeout))
      .then([this, s](kj::Own<kj::AsyncIoStream>&& stream) {
    s->release();
    ++stats.connectionsOpened;
    return kj::refcounted<Connection>(*this, kj::mv(stream));
  }, [this, s](kj::Exception&& e) -> kj::Own<Connection> {
    s->release();
    ++stats.connectFailures;
    serveWaiters();
    kj::throwFatalException(kj::mv(e));
  }).attach(kj::mv(slot));
}

void ConnectionPool::connectionIdle(Connection& connection, bool keepIdleSince) {
  // The connection came back clean: from a request (called from within its fetcher), just
  // opened for a request that gave up (connectFor()), or unused (readopt()). The caller holds it:
  // nothing here destroys it. `keepIdleSince`: it comes back unused, so its idle time runs on
  // from when it last became idle; if that is past idleTimeout, it is closed.
  connection.everIdle = true;
  if (!keepIdleSince) {
    connection.idleSince = timer.now();
  } else if (connection.idleSince + settings.idleTimeout <= timer.now()) {
    retire(connection, &Stats::droppedIdleTimeout);
    serveWaiters();
    return;
  }
  if (settings.neverReuse) {
    retire(connection, &Stats::droppedNeverReuse);
    serveWaiters();
    return;
  }
  if (settings.maxRequestsPerConnection > 0 &&
      connection.uses >= settings.maxRequestsPerConnection) {
    retire(connection, &Stats::droppedMaxRequests);
    serveWaiters();
    return;
  }
  while (!waiters.empty()) {
    auto& waiter = waiters.oldest();
    waiter.unlink();
    if (!waiter.fulfiller->isWaiting()) continue;
    if (waiter.fresh) {
      // A retry must not reuse: close this one and open a new connection for it.
      retire(connection, &Stats::droppedForRetry);
      waiter.progress->connecting = true;
      connectFor(kj::mv(waiter.fulfiller));
      return;
    }
    waiter.fulfiller->fulfill(kj::addRef(connection));
    return;
  }
  if (idle.size() >= settings.maxIdleConnections) {
    retire(connection, &Stats::droppedIdleLimit);
    return;
  }
  addIdle(connection);
  scheduleSweep();
}

void ConnectionPool::retire(Connection& connection, uint64_t Stats::*counter) {
  // Closes a connection that came back clean but is not kept. Its fetcher is calling us: take
  // the connection out of it and close it after this event.
  ++(stats.*counter);
  connection.detach();
  tasks.add(kj::evalLater([stream = connection.fetcher->release()]() {}));
}

void ConnectionPool::scheduleSweep() {
  // One timer for the whole pool, due when the oldest idle connection (the front) expires.
  if (sweepScheduled || idle.empty()) return;
  sweepScheduled = true;
  tasks.add(timer.atTime(idle.oldest().idleSince + settings.idleTimeout).then([this]() {
    sweepScheduled = false;
    auto now = timer.now();
    while (!idle.empty() && idle.oldest().idleSince + settings.idleTimeout <= now) {
      closeOldestIdle(&Stats::droppedIdleTimeout);
    }
    scheduleSweep();
  }));
}

void ConnectionPool::readopt(kj::Own<StreamFetcher> fetcher, uint64_t uses,
    kj::TimePoint idleSince) {
  // As if the fetcher had just reported idle, but with its idle time running on from
  // `idleSince`: the next waiter gets it, or the idle chain, or it is closed as any connection
  // coming back is (expired, idle limit, maxRequestsPerConnection, ...).
  auto connection = kj::refcounted<Connection>(*this, kj::mv(fetcher), uses, idleSince);
  bool keepIdleSince = true;
  connectionIdle(*connection, keepIdleSince);
}

void ConnectionPool::addIdle(Connection& connection) {
  // The chain is ordered by idleSince, which the sweep relies on. The usual connection is the
  // newest. One that came back unused (readopt()) keeps the idleSince it had, and others may
  // have become idle, or come back unused, while it was out: it goes after the last that is not
  // newer. (If the event loop read the clock while it was out, its expiry may come before the
  // sweep already scheduled, which then closes it late, by less than idleTimeout.)
  connection.idleSelf = kj::addRef(connection);
  if (idle.empty() || idle.newest().idleSince <= connection.idleSince) {
    idle.add(connection);
    return;
  }
  Connection* newer = &idle.newest();
  while (newer->chainLink.older != nullptr &&
         newer->chainLink.older->idleSince > connection.idleSince) {
    newer = newer->chainLink.older;
  }
  idle.addOlderThan(*newer, connection);
}

kj::Own<ConnectionPool::Connection> ConnectionPool::removeIdle(Connection& connection) {
  idle.remove(connection);
  return kj::mv(connection.idleSelf);
}

void ConnectionPool::closeOldestIdle(uint64_t Stats::*counter) {
  ++(stats.*counter);
  auto connection = removeIdle(idle.oldest());
  connection->detach();
  dispose(kj::mv(connection));
  serveWaiters();
}

void ConnectionPool::connectionClosed(Connection& connection) {
  // Called from within the fetcher (possibly from its idle watch): defer any destruction.
  auto& fetcher = *connection.fetcher;
  if (fetcher.getCloseKind() == StreamFetcher::CloseKind::FAILED &&
      fetcher.getCompletedRequests() > 0 && !fetcher.lastExchangeReceivedResponse()) {
    ++stats.droppedStale;
  } else if (fetcher.getCloseKind() == StreamFetcher::CloseKind::PEER_CLOSED_IDLE &&
      !connection.everIdle) {
    ++stats.droppedPeerClosedNew;
  } else {
    countClose(fetcher.getCloseKind());
  }
  connection.detach();
  if (connection.chainLink.linked) dispose(removeIdle(connection));
  serveWaiters();
}

void ConnectionPool::dispose(kj::Own<Connection> connection) {
  tasks.add(kj::evalLater([connection = kj::mv(connection)]() {}));
}

void ConnectionPool::serveWaiters() {
  // Capacity was freed: open connections for waiting requests.
  while (!waiters.empty() && getOpenCount() < settings.maxConnections) {
    auto& waiter = waiters.oldest();
    waiter.unlink();
    if (!waiter.fulfiller->isWaiting()) continue;
    waiter.progress->connecting = true;
    connectFor(kj::mv(waiter.fulfiller));
  }
}

void ConnectionPool::connectFor(kj::Own<kj::PromiseFulfiller<kj::Own<Connection>>> fulfiller) {
  auto* f = fulfiller.get();
  tasks.add(connect().then([this, f](kj::Own<Connection>&& connection) {
    if (f->isWaiting()) {
      f->fulfill(kj::mv(connection));
    } else {
      // The request gave up while this connection was opened: it serves the next one, or idles.
      connectionIdle(*connection);
    }
  }, [f](kj::Exception&& e) {
    f->reject(kj::mv(e));
  }).attach(kj::mv(fulfiller)));
}

kj::Exception ConnectionPool::sayFailure(Connection& connection, kj::Exception&& e) {
  // How a request's failure on `connection` reaches the caller: a new connection lost before
  // anything of the request was written (found at its first write, after the fetcher took the
  // request) in the pool's words, as when the fetcher refuses it at once; anything else as it is.
  if (!connection.lostBeforeWritten(e)) return kj::mv(e);
  return lostBeforeSent(*connection.fetcher, kj::mv(e), upstreamName);
}

void ConnectionPool::uncountUse(Connection& connection) {
  // A request counted as a reuse (countUse()) found its connection lost before anything of it
  // was written, and goes on another (see Connection::lostWhileIdle()): no reuse after all.
  if (connection.uses > 1) --stats.reuses;
}

void ConnectionPool::countClose(StreamFetcher::CloseKind kind) {
  switch (kind) {
    case StreamFetcher::CloseKind::NONE: break;
    case StreamFetcher::CloseKind::PEER_CLOSED_IDLE: ++stats.droppedPeerClosedIdle; break;
    case StreamFetcher::CloseKind::UNSOLICITED_BYTES: ++stats.droppedUnsolicitedBytes; break;
    case StreamFetcher::CloseKind::CONNECTION_CLOSE: ++stats.droppedConnectionClose; break;
    case StreamFetcher::CloseKind::NOT_REUSABLE: ++stats.droppedNotReusable; break;
    case StreamFetcher::CloseKind::UPGRADED: ++stats.droppedUpgraded; break;
    case StreamFetcher::CloseKind::ABANDONED: ++stats.droppedAbandoned; break;
    case StreamFetcher::CloseKind::REQUEST_INCOMPLETE: ++stats.droppedRequestIncomplete; break;
    case StreamFetcher::CloseKind::FAILED: ++stats.droppedFailed; break;
  }
}

}  // namespace sockfetch
