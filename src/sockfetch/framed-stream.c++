#include "framed-stream.h"

#include <sockfetch/kj-compat.h>

#include <kj/debug.h>
#include <errno.h>
#include <typeinfo>
#include <string.h>
#include <poll.h>
#include <sys/socket.h>

namespace sockfetch {

namespace {

constexpr kj::StringPtr CHUNKED_TERMINATOR = "0\r\n\r\n"_kj;
// kj-http writes the last chunk of a chunked request body as exactly these bytes, in one write.

constexpr size_t DIRECT_READ_MIN = 2048;
// A consumer buffer at least this big is filled straight from the connection when possible.

constexpr kj::StringPtr POISONED_IDLE = "the server sent data on the idle connection while no "
    "request was outstanding, so the connection was dropped as poisoned"_kj;
constexpr kj::StringPtr CLOSED_IDLE = "the server closed the idle connection"_kj;
constexpr kj::StringPtr CLOSED_NEW = "the server closed the connection before any request was "
    "sent on it"_kj;

}  // namespace

FramedStream::ExchangeView::ExchangeView(FramedStream& s): stream(s) {
  s.detachView();
  s.currentView = *this;
}

FramedStream::ExchangeView::~ExchangeView() noexcept(false) {
  KJ_IF_SOME(s, stream) {
    s.currentView = nullptr;
  }
}

kj::Promise<size_t> FramedStream::ExchangeView::tryRead(
    void* buffer, size_t minBytes, size_t maxBytes) {
  KJ_IF_SOME(s, stream) {
    return s.tryRead(buffer, minBytes, maxBytes);
  }
  return kj::Promise<size_t>(kj::NEVER_DONE);
}

kj::Promise<void> FramedStream::ExchangeView::write(const void* buffer, size_t size) {
  return get().write(buffer, size);
}

kj::Promise<void> FramedStream::ExchangeView::write(
    kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  return get().write(pieces);
}

kj::Promise<void> FramedStream::ExchangeView::whenWriteDisconnected() {
  KJ_IF_SOME(s, stream) {
    return s.whenWriteDisconnected();
  }
  return kj::NEVER_DONE;
}

void FramedStream::ExchangeView::shutdownWrite() {
  KJ_IF_SOME(s, stream) {
    s.shutdownWrite();
  }
}

void FramedStream::ExchangeView::abortRead() {
  // (kj's WebSocket::abort() calls it: a receive() pending on the connection must end.)
  KJ_IF_SOME(s, stream) {
    s.abortRead();
  }
}

FramedStream& FramedStream::ExchangeView::get() {
  KJ_IF_SOME(s, stream) {
    return s;
  }
  kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED,
      "this exchange is over; its connection has moved on"));
}

namespace {

constexpr unsigned SETTLE_TURNS = 16;
// Turns of the event loop a gate lets pass on a stream other than a plain socket: more than any
// stream kj has (TLS included) takes to report a read after the socket read that fed it.

bool isPlainSocket(kj::AsyncIoStream& stream) {
  // Whether `stream` is kj's own file-descriptor stream over a stream socket, whose bytes are
  // exactly the socket's: no transformation, nothing buffered in user space, a read reported in
  // the event after the one that read(2) its bytes. Wrappers (TLS, say) may expose the descriptor
  // too, but asking the kernel would not tell what they hold.
  KJ_IF_SOME(fd, stream.getFd()) {
    int type = 0;
    socklen_t length = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) != 0 || type != SOCK_STREAM) {
      return false;
    }
    return strstr(typeid(stream).name(), "AsyncStreamFd") != nullptr;
  }
  return false;
}

bool hasUnreadInput(int fd) {
  // Whether the kernel holds input (or an end of input) for `fd` that nobody has read yet.
  struct pollfd p = {fd, POLLIN, 0};
  int n;
  do {
    n = ::poll(&p, 1, 0);
  } while (n < 0 && errno == EINTR);
  return n > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)) != 0;
}

kj::Promise<size_t> tryReadSafely(kj::AsyncIoStream& stream, void* buffer, size_t minBytes,
    size_t maxBytes) {
  // kj's socket streams throw some errors (a connection reset) from tryRead() itself rather than
  // failing its promise; every read here must fail as a promise, or its error handler is skipped.
  return kj::evalNow([&]() { return stream.tryRead(buffer, minBytes, maxBytes); });
}

kj::Exception readFailure(kj::Exception&& e, bool upgraded) {
  // A read of the connection failed while a response was read (a reset, a TLS error): said as
  // such, since kj's own words ("::read(fd, buffer, maxBytes): Connection reset by peer") do not
  // say what it meant. The framer's own refusals (a head over its limit, found as space for the
  // read is asked for) say it already. After an upgrade there is no response to repeat.
  if (kj::StringPtr(e.getFile()).endsWith("response-framer.c++")) return kj::mv(e);
  if (upgraded) {
    return kj::Exception(e.getType(), __FILE__, __LINE__, kj::str("the connection failed after "
        "it was upgraded to another protocol, a WebSocket say (", e.getDescription(), "); open a "
        "new one if it is still needed"));
  }
  return kj::Exception(e.getType(), __FILE__, __LINE__, kj::str("the connection failed while "
      "the response was read (", e.getDescription(), "), so the response is incomplete; retry on "
      "a new connection if the request is safe to repeat"));
}

kj::Promise<void> turns(unsigned n) {
  // Lets `n` turns of the event loop pass.
  if (n == 0) return kj::READY_NOW;
  return kj::evalLater([n]() { return turns(n - 1); });
}

}  // namespace

// =================================================================================================
// ProbeStarter

class FramedStream::ProbeStarter final: public kj::Refcounted {
  // Starts the idle reads of a thread's plain sockets once the event loop has nothing else to do,
  // with one deferral (kj::evalLast()) for every stream that went idle since the loop last was,
  // rather than one each: with many connections in use, most of them go idle and busy again
  // before the loop is ever idle, and then cost no promise at all. The thread's plain-socket
  // streams share it and keep it alive, so it never outlives them (nor their event loop).
public:
  static kj::Own<ProbeStarter> forThisThread() {
    if (current != nullptr) return kj::addRef(*current);
    return kj::refcounted<ProbeStarter>();
  }

  ProbeStarter() { current = this; }
  ~ProbeStarter() noexcept(false) {
    if (current == this) current = nullptr;
  }
  KJ_DISALLOW_COPY(ProbeStarter);

  void add(FramedStream& stream) {
    // The stream's idle read is due; a stream already listed stays as it is.
    if (stream.linkToProbe != nullptr) return;
    stream.nextToProbe = head;
    if (head != nullptr) head->linkToProbe = &stream.nextToProbe;
    head = &stream;
    stream.linkToProbe = &head;
    if (!scheduled) {
      // Replacing the last deferral is safe: it has fired (`scheduled` is cleared only after
      // run()), and run() never adds.
      scheduled = true;
      deferral = kj::evalLast([this]() { run(); }).eagerlyEvaluate(nullptr);
    }
  }

  static void remove(FramedStream& stream) {
    // The stream's idle read is no longer due (it began an exchange, or is going away).
    if (stream.linkToProbe == nullptr) return;
    *stream.linkToProbe = stream.nextToProbe;
    if (stream.nextToProbe != nullptr) stream.nextToProbe->linkToProbe = stream.linkToProbe;
    stream.nextToProbe = nullptr;
    stream.linkToProbe = nullptr;
  }

private:
  static thread_local ProbeStarter* current;
  FramedStream* head = nullptr;
  bool scheduled = false;
  kj::Promise<void> deferral = nullptr;

  void run() {
    KJ_DEFER(scheduled = false);
    while (head != nullptr) {
      auto& stream = *head;
      remove(stream);
      stream.startProbe();
    }
  }
};

thread_local FramedStream::ProbeStarter* FramedStream::ProbeStarter::current = nullptr;

// =================================================================================================
// FramedStream

FramedStream::FramedStream(kj::Own<kj::AsyncIoStream> raw, ResponseFramer::Limits limits,
    kj::Maybe<kj::Timer&> timer)
    : raw(kj::mv(raw)), framer(limits), timer(timer), plainSocket(isPlainSocket(*this->raw)),
      hasFd(this->raw->getFd() != nullptr) {
  if (plainSocket) probeStarter = ProbeStarter::forThisThread();
  // A stream a StreamFetcher released (see StreamFetcher::release()) keeps its history: bytes
  // its server sends later did not come first.
  if (auto released = dynamic_cast<FramedStream*>(this->raw.get())) {
    carriedExchange = released->carriedExchange;
  }
}

FramedStream::~FramedStream() noexcept(false) {
  ProbeStarter::remove(*this);
  gateCanceler.cancel("the connection was closed before the request was written");
  detachView();
}

void FramedStream::detachView() {
  KJ_IF_SOME(view, currentView) {
    view.detach();
    currentView = nullptr;
  }
}

void FramedStream::watchIdle(IdleListener& listener) {
  detachView();
  if (mode == Mode::EXCHANGE) carriedExchange = true;
  mode = Mode::IDLE;
  gate = nullptr;  // the last exchange is over; an idle connection holds as little as it can
  idleListener = listener;
  framer.freeBuffer();
  if (probeOutcome != nullptr) return;  // already watching (or lost: the listener was told)
  if (plainSocket) {
    // On a socket the idle read starts only once the event loop has nothing else to do: a next
    // request that comes sooner (the common case) finds no read to deal with, and checkIdleNow()
    // asks the kernel directly, which consumes nothing.
    probeStarter->add(*this);
  } else {
    startProbe();
  }
}

void FramedStream::startProbe() {
  probeOutcome = ProbeOutcome(ProbePending());
  probe = tryReadSafely(*raw, &probeByte, 1, 1)
      .then([this](size_t n) {
    if (n == 0) {
      probeOutcome = ProbeOutcome(ProbeGotEof());
    } else {
      probeOutcome = ProbeOutcome(ProbeGotByte());
    }
    probeDone();
  }, [this](kj::Exception&& e) {
    probeOutcome = ProbeOutcome(kj::mv(e));
    probeDone();
  }).eagerlyEvaluate(nullptr);
}

void FramedStream::probeDone() {
  KJ_IF_SOME(waiter, probeWaiter) {
    (waiter)->fulfill();
    probeWaiter = nullptr;
  }
  if (mode != Mode::IDLE) return;  // an exchange's gate or a pass-through read deals with it
  KJ_IF_SOME(listener, idleListener) {
    auto loss = KJ_ASSERT_NONNULL(probeLoss());
    idleListener = nullptr;
    listener.idleConnectionLost(loss.gotBytes, kj::mv(loss.reason));
  }
}

kj::Maybe<FramedStream::IdleLoss> FramedStream::probeLoss() {
  KJ_IF_SOME(outcome, probeOutcome) {
    if (outcome.is<ProbeGotByte>()) {
      return unsolicited(kj::arrayPtr(reinterpret_cast<const char*>(&probeByte), 1));
    } else if (outcome.is<ProbeGotEof>()) {
      return endedWhileIdle(nullptr);
    } else if (outcome.is<kj::Exception>()) {
      return endedWhileIdle(outcome.get<kj::Exception>().getDescription());
    }
  }
  return nullptr;
}

kj::Maybe<FramedStream::IdleLoss> FramedStream::checkIdleNow() {
  KJ_IF_SOME(loss, probeLoss()) {
    return kj::mv(loss);
  }
  return peekSocket();
}

kj::Maybe<FramedStream::IdleLoss> FramedStream::peekSocket() {
  if (!plainSocket) return nullptr;
  KJ_IF_SOME(fd, raw->getFd()) {
    // Ask the kernel directly, without consuming anything: bytes or EOF it holds may not have
    // been reported by the event loop yet.
    char seen[40];  // enough to show what came in an error message
    ssize_t n;
    do {
      n = recv(fd, seen, sizeof(seen), MSG_PEEK | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n > 0) return unsolicited(kj::arrayPtr(seen, n));
    if (n == 0) return endedWhileIdle(nullptr);
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOTSOCK) {
      return endedWhileIdle(strerror(errno));
    }
  }
  return nullptr;
}

FramedStream::IdleLoss FramedStream::endedWhileIdle(kj::StringPtr error) const {
  if (error.size() == 0) {
    return IdleLoss{false, kj::str(carriedExchange ? CLOSED_IDLE : CLOSED_NEW)};
  }
  return IdleLoss{false, kj::str(carriedExchange ? "the idle connection failed: "
      : "the connection failed before any request was sent on it: ", error)};
}

FramedStream::IdleLoss FramedStream::unsolicited(kj::ArrayPtr<const char> seen) {
  if (carriedExchange) return IdleLoss{true, kj::str(POISONED_IDLE)};
  return IdleLoss{true, kj::str("the server sent data on the connection before any request was "
      "sent on it (it began with ", quoteBytes(seen), "), which an HTTP/1.1 server never does; "
      "check that the upstream address is an HTTP server"), true};
}

void FramedStream::beginExchange(kj::HttpMethod method) {
  KJ_REQUIRE(mode == Mode::IDLE, "FramedStream: an exchange may only begin on an idle stream");
  mode = Mode::EXCHANGE;
  idleListener = nullptr;
  gateLoss = nullptr;
  framer.start(method, carriedExchange);
  writesInFlight = 0;
  writesCompleted = 0;
  chunkedTerminatorWritten = false;
  bodyBuffer = nullptr;
  if (probeOutcome == nullptr) {
    // The idle read never started (a plain socket, see watchIdle()): nothing was consumed, and
    // checkIdleNow() has just asked the kernel. Nothing to wait for.
    ProbeStarter::remove(*this);
    gatePassed = true;
    return;
  }
  // The idle read is never cancelled: it may already have consumed a byte whose continuation has
  // not run yet (a stream commonly completes a read in one event and runs its continuation in a
  // later one), and cancelling it would lose that byte. Instead the exchange adopts it: its
  // outcome becomes the start of the response (see fill()).
  //
  // Before the first byte of the request is written, the gate lets the idle read report
  // whatever it got: an idle read that completed has its continuation queued, one turn of the
  // event loop later on a plain socket (whose kernel is then asked too), up to SETTLE_TURNS later
  // on other streams (TLS takes several). If the gate sees a loss, the exchange fails with
  // nothing written.
  gatePassed = false;
  gate = gateCanceler.wrap(settleGate(true)).fork();  // the chain uses `this`: see the header
}

kj::Promise<void> FramedStream::settleGate(bool mayWaitForInput) {
  return turns(plainSocket ? 1 : SETTLE_TURNS).then([this, mayWaitForInput]() -> kj::Promise<void> {
    checkGate();
    if (!plainSocket && mayWaitForInput) {
      KJ_IF_SOME(fd, raw->getFd()) {
        KJ_IF_SOME(t, timer) {
          if (hasUnreadInput(fd)) {
            // The kernel holds something the stream has not read yet (the event loop has not
            // polled since it came): let it poll once, then settle and look again. What the
            // stream makes of it (data, a close, or nothing, like a TLS session ticket) decides.
            // (Or until the idle read reports, which settles it too.)
            auto polled = t.afterDelay(0 * kj::NANOSECONDS);
            if (probeOutcome != nullptr && KJ_ASSERT_NONNULL(probeOutcome).is<ProbePending>()) {
              polled = polled.exclusiveJoin(awaitProbe());
            }
            return polled.then([this]() { return settleGate(false); });
          }
        }
      }
    }
    gatePassed = true;
    return kj::READY_NOW;
  });
}

void FramedStream::checkGate() {
  KJ_IF_SOME(loss, checkIdleNow()) {
    failGate(kj::mv(loss));
  }
}

void FramedStream::failGate(IdleLoss loss) {
  auto exception = loss.serverSpokeFirst ? KJ_EXCEPTION(DISCONNECTED, kj::str(loss.reason))
      : loss.gotBytes
      ? KJ_EXCEPTION(DISCONNECTED, "the server sent data on the idle connection before the "
            "request was written, so the connection was dropped as poisoned; retry on a new "
            "connection")
      : KJ_EXCEPTION(DISCONNECTED, kj::str(loss.reason, carriedExchange
            ? " before the request was written" : " (nothing was written)",
            "; retry on a new connection"));
  gateLoss = kj::mv(loss);
  kj::throwFatalException(kj::mv(exception));
}

kj::Promise<void> FramedStream::passGate() {
  if (gatePassed) return kj::READY_NOW;
  return KJ_ASSERT_NONNULL(gate).addBranch();
}

kj::Promise<void> FramedStream::finishResponse() {
  if (framer.isComplete()) return kj::READY_NOW;
  KJ_IF_SOME(failure, framer.getFailure()) {
    return cloneException(failure);
  }
  if (rawEof) {
    framer.receivedEof();
    return finishResponse();
  }
  return fill().then([this]() { return finishResponse(); });
}

void FramedStream::passThrough() {
  ProbeStarter::remove(*this);  // an idle read that never started has nothing to hand over
  if (mode == Mode::IDLE) detachView();  // released: no exchange may touch it any more
  mode = Mode::PASS_THROUGH;
  idleListener = nullptr;
  framer.passThrough();
}

kj::Promise<size_t> FramedStream::tryRead(void* buffer, size_t minBytes, size_t maxBytes) {
  auto bytes = reinterpret_cast<kj::byte*>(buffer);
  switch (mode) {
    case Mode::EXCHANGE:
      if (gatePassed) return readLoop(bytes, minBytes, maxBytes, 0);
      return passGate().then([this, bytes, minBytes, maxBytes]() {
        return readLoop(bytes, minBytes, maxBytes, 0);
      });
    case Mode::PASS_THROUGH:
      return passThroughRead(bytes, minBytes, maxBytes);
    case Mode::IDLE:
      break;
  }
  KJ_FAIL_REQUIRE("FramedStream: read while idle; begin an exchange first");
}

kj::Promise<size_t> FramedStream::readLoop(
    kj::byte* buffer, size_t minBytes, size_t maxBytes, size_t done) {
  done += framer.take(kj::arrayPtr(buffer + done, maxBytes - done));
  if (done >= minBytes) return done;
  KJ_IF_SOME(failure, framer.getFailure()) {
    // Everything before the error was passed on; the consumer sees the error next.
    if (done > 0) return done;
    return cloneException(failure);
  }
  if (rawEof) return done;  // the end of a body delimited by the connection closing
  if (framer.available() == 0 && !framer.mayGrow()) {
    // The consumer has everything of this response it may see. kj-http reads on after a response
    // (to notice the connection closing); that read must not see the next bytes, so it waits
    // until the per-fetch client is destroyed.
    if (done > 0) return done;
    if (bodyBuffer.begin() <= buffer && buffer < bodyBuffer.end()) {
      return KJ_EXCEPTION(FAILED, "the response's body reached past the end of the response as "
          "framed from its head (a malformed or ambiguous response); the connection was dropped, "
          "check the upstream server");
    }
    return kj::Promise<size_t>(kj::NEVER_DONE);
  }
  size_t direct = framer.directReadLimit();
  if (direct > 0 && maxBytes - done >= DIRECT_READ_MIN && probeOutcome == nullptr) {
    // Body data with nothing buffered: read it straight into the consumer's buffer (no copy, and
    // as much as the consumer asked for), but never past the end of the body.
    size_t want = kj::min(maxBytes - done, direct);
    return startRawRead(buffer + done, want)
        .then([this, buffer, minBytes, maxBytes, done](size_t n) {
      rawReadOutstanding = false;
      if (n == 0) {
        rawEof = true;
        framer.receivedEof();
      } else {
        framer.receivedDirect(n);
      }
      return readLoop(buffer, minBytes, maxBytes, done + n);
    }, [this](kj::Exception&& e) -> kj::Promise<size_t> {
      return rawReadFailed(kj::mv(e));
    });
  }
  if (probeOutcome == nullptr) {
    // The usual case: read more of the response into the framer and look again, in one step.
    return readRaw().then([this, buffer, minBytes, maxBytes, done](size_t n) {
      receivedRaw(n);
      return readLoop(buffer, minBytes, maxBytes, done);
    }, [this](kj::Exception&& e) -> kj::Promise<size_t> {
      return rawReadFailed(kj::mv(e));
    });
  }
  return fill().then([this, buffer, minBytes, maxBytes, done]() {
    return readLoop(buffer, minBytes, maxBytes, done);
  });
}

kj::Promise<void> FramedStream::fill() {
  KJ_IF_SOME(outcome, probeOutcome) {
    // The exchange adopted the idle read (see beginExchange()): its outcome comes first.
    if (outcome.is<ProbePending>()) {
      return awaitProbe().then([this]() { return fill(); });
    }
    ProbeOutcome taken = takeProbe();
    KJ_SWITCH_ONEOF(taken) {
      KJ_CASE_ONEOF(pending, ProbePending) {
        KJ_UNREACHABLE;
      }
      KJ_CASE_ONEOF(gotByte, ProbeGotByte) {
        auto space = framer.space();  // an empty framer has room for a byte: cannot throw
        space[0] = probeByte;
        framer.received(1);
        // The first byte of a response never completes it: read on at once.
        return fillFromRaw();
      }
      KJ_CASE_ONEOF(gotEof, ProbeGotEof) {
        rawEof = true;
        framer.receivedEof();
      }
      KJ_CASE_ONEOF(error, kj::Exception) {
        return kj::mv(error);
      }
    }
    return kj::READY_NOW;
  }
  return fillFromRaw();
}

kj::Promise<void> FramedStream::fillFromRaw() {
  return readRaw().then([this](size_t n) { receivedRaw(n); }, [this](kj::Exception&& e) {
    kj::throwFatalException(rawReadFailed(kj::mv(e)));
  });
}

kj::Promise<size_t> FramedStream::readRaw() {
  kj::ArrayPtr<kj::byte> space;
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { space = framer.space(); })) {
    return kj::mv(e);  // the head outgrew its limit: a failed read, never a synchronous throw
  }
  return startRawRead(space.begin(), space.size());
}

kj::Promise<size_t> FramedStream::startRawRead(kj::byte* into, size_t maxBytes) {
  if (framer.isUpgrade()) {
    // The new protocol's bytes (a WebSocket's), read as kj's own stream reads them: there is no
    // response to lose track of, and the connection is never reused.
    return tryReadSafely(*raw, into, 1, maxBytes);
  }
  if (rawReadOutstanding) {
    readCancelled = framer.getFailure() == nullptr;
    framer.fail(KJ_EXCEPTION(FAILED, "a read of the response was cancelled, and it may have "
        "taken bytes from the connection (which cannot be told), so where the response ends is "
        "no longer known; the connection was dropped: read a body to its end, or drop it, rather "
        "than cancel a read and read on"));
    return cloneException(KJ_ASSERT_NONNULL(framer.getFailure()));
  }
  rawReadOutstanding = true;
  return tryReadSafely(*raw, into, 1, maxBytes);
}

kj::Exception FramedStream::rawReadFailed(kj::Exception&& e) {
  rawReadOutstanding = false;
  KJ_IF_SOME(failure, framer.getFailure()) {
    return cloneException(failure);  // (a cancelled read, found as the next one started)
  }
  return readFailure(kj::mv(e), framer.isUpgrade());
}

void FramedStream::receivedRaw(size_t n) {
  rawReadOutstanding = false;
  if (n == 0) {
    rawEof = true;
    framer.receivedEof();
  } else {
    framer.received(n);
  }
}

kj::Promise<void> FramedStream::awaitProbe() {
  auto paf = kj::newPromiseAndFulfiller<void>();
  probeWaiter = kj::mv(paf.fulfiller);
  return kj::mv(paf.promise);
}

FramedStream::ProbeOutcome FramedStream::takeProbe() {
  // Only once the idle read completed: its promise is done and may be dropped.
  ProbeOutcome taken = kj::mv(KJ_ASSERT_NONNULL(probeOutcome));
  probeOutcome = nullptr;
  probe = nullptr;
  return taken;
}

kj::Promise<size_t> FramedStream::passThroughRead(
    kj::byte* buffer, size_t minBytes, size_t maxBytes) {
  size_t done = 0;
  KJ_IF_SOME(outcome, probeOutcome) {
    if (outcome.is<ProbePending>()) {
      // The idle read may already hold a byte: wait for it rather than cancel it (unless the
      // caller wants nothing now: nothing else is buffered while it is outstanding).
      if (minBytes == 0) return size_t(0);
      return awaitProbe().then([this, buffer, minBytes, maxBytes]() {
        return passThroughRead(buffer, minBytes, maxBytes);
      });
    }
    if (maxBytes == 0) return size_t(0);  // nothing to put the idle read's byte in: keep it
    ProbeOutcome taken = takeProbe();
    KJ_SWITCH_ONEOF(taken) {
      KJ_CASE_ONEOF(pending, ProbePending) {
        KJ_UNREACHABLE;
      }
      KJ_CASE_ONEOF(gotByte, ProbeGotByte) {
        buffer[0] = probeByte;
        done = 1;
      }
      KJ_CASE_ONEOF(gotEof, ProbeGotEof) {
        rawEof = true;
      }
      KJ_CASE_ONEOF(error, kj::Exception) {
        return kj::mv(error);
      }
    }
  }
  done += framer.take(kj::arrayPtr(buffer + done, maxBytes - done));
  if (done >= minBytes || rawEof) return done;
  return tryReadSafely(*raw, buffer + done, minBytes - done, maxBytes - done)
      .then([done](size_t n) { return done + n; });
}

kj::Promise<void> FramedStream::trackWrite(kj::Promise<void> promise, bool isTerminator) {
  // `promise` comes from evalNow(): kj's sockets throw some write errors (a reset, a broken pipe)
  // from write() itself, and such a write must count as failed like any other.
  ++writesInFlight;
  if (!hasFd) {
    // Only shutdownNow() can end a write the peer never reads on a stream without a descriptor.
    promise = rawWrites.wrap(kj::mv(promise));
  }
  // Eager: kj-http does not always wait on its write queue, and the bookkeeping must not depend
  // on someone pulling the promise.
  return promise.then([this, isTerminator]() {
    --writesInFlight;
    ++writesCompleted;
    if (isTerminator) chunkedTerminatorWritten = true;
  }).eagerlyEvaluate(nullptr);
  // A failed or cancelled write stays "in flight": the connection is then in an unknown state
  // and the fetcher will not reuse it.
}

void FramedStream::refuseWrites(kj::String message) {
  if (refusal == nullptr) refusal = kj::mv(message);
}

void FramedStream::shutdownNow() {
  if (shutDown) return;
  shutDown = true;
  KJ_IF_SOME(fd, raw->getFd()) {
    ::shutdown(fd, SHUT_RDWR);  // may fail if the peer is gone already: nothing more to do then
  } else {
    // No descriptor (an in-process pipe, kj-tls's stream): end the write side, which the peer
    // reads as the end of the connection, once no write is pending (kj refuses that): a write
    // still waiting for the peer to read is dropped first (the caller's write then fails, or is
    // discarded after an early answer).
    rawWrites.cancel("the connection was closed");
    kj::runCatchingExceptions([&]() { raw->shutdownWrite(); });
  }
}

kj::Maybe<kj::Exception> FramedStream::writeRefusal() {
  KJ_IF_SOME(message, refusal) {
    return KJ_EXCEPTION(DISCONNECTED, kj::str(message));
  }
  return nullptr;
}

kj::Promise<void> FramedStream::write(const void* buffer, size_t size) {
  KJ_IF_SOME(e, writeRefusal()) {
    return kj::mv(e);
  }
  if (!gatePassed) {
    return passGate().then([this, buffer, size]() { return write(buffer, size); });
  }
  bool isTerminator = mode == Mode::EXCHANGE && size == CHUNKED_TERMINATOR.size() &&
      memcmp(buffer, CHUNKED_TERMINATOR.begin(), size) == 0;
  struct iovec piece = {const_cast<void*>(buffer), size};
  size_t sent = 0;
  KJ_IF_SOME(ended, sendNow(&piece, 1, size, isTerminator, sent)) {
    return kj::mv(ended);
  }
  auto rest = reinterpret_cast<const kj::byte*>(buffer) + sent;
  return trackWrite(kj::evalNow([&]() { return raw->write(rest, size - sent); }), isTerminator);
}

kj::Promise<void> FramedStream::write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  KJ_IF_SOME(e, writeRefusal()) {
    return kj::mv(e);
  }
  if (!gatePassed) {
    return passGate().then([this, pieces]() { return write(pieces); });
  }
  size_t total = 0;
  for (auto& piece: pieces) total += piece.size();
  bool isTerminator = false;
  if (mode == Mode::EXCHANGE && total == CHUNKED_TERMINATOR.size()) {
    char joined[5];
    size_t pos = 0;
    for (auto& piece: pieces) {
      memcpy(joined + pos, piece.begin(), piece.size());
      pos += piece.size();
    }
    isTerminator = memcmp(joined, CHUNKED_TERMINATOR.begin(), 5) == 0;
  }
  constexpr size_t MAX_PIECES = 16;
  if (pieces.size() <= MAX_PIECES) {
    struct iovec iov[MAX_PIECES];
    for (size_t i = 0; i < pieces.size(); i++) {
      iov[i] = {const_cast<kj::byte*>(pieces[i].begin()), pieces[i].size()};
    }
    size_t sent = 0;
    KJ_IF_SOME(ended, sendNow(iov, pieces.size(), total, isTerminator, sent)) {
      return kj::mv(ended);
    }
    if (sent > 0) {
      // kj writes the rest: the pieces not yet sent, the first of them cut where the kernel
      // stopped. The bytes stay the caller's (valid until the write completes, as for any write);
      // only the list of pieces is new.
      size_t first = 0;
      while (sent >= pieces[first].size()) sent -= pieces[first++].size();
      auto rest = kj::heapArray<kj::ArrayPtr<const kj::byte>>(pieces.size() - first);
      rest[0] = pieces[first].slice(sent, pieces[first].size());
      for (size_t i = 1; i < rest.size(); i++) rest[i] = pieces[first + i];
      auto restPtr = rest.asPtr();
      return trackWrite(kj::evalNow([&]() { return raw->write(restPtr); }).attach(kj::mv(rest)),
          isTerminator);
    }
  }
  return trackWrite(kj::evalNow([&]() { return raw->write(pieces); }), isTerminator);
}

kj::Maybe<kj::Promise<void>> FramedStream::sendNow(const struct iovec* iov, size_t count,
    size_t total, bool isTerminator, size_t& sent) {
  // On a plain socket with no write of kj's pending (which would have to go first), sends what
  // the kernel takes at once: the usual request then costs a system call and no continuation.
  // What the kernel does not take now (its buffer is full) is left to kj's write. An error is
  // reported here, as kj would: the kernel reports some (a reset) to one call only.
  sent = 0;
  if (!plainSocket || writesInFlight > 0 || total == 0) return nullptr;
  KJ_IF_SOME(fd, raw->getFd()) {
    struct msghdr message;
    memset(&message, 0, sizeof(message));
    message.msg_iov = const_cast<struct iovec*>(iov);
    message.msg_iovlen = count;
    ssize_t n;
    do {
      n = sendmsg(fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n >= 0) {
      sent = n;
      if (sent < total) return nullptr;
      ++writesCompleted;
      if (isTerminator) chunkedTerminatorWritten = true;
      return kj::Promise<void>(kj::READY_NOW);
    }
    int error = errno;
    if (error != EAGAIN && error != EWOULDBLOCK && error != ENOTSOCK) {
      // Failed: the kernel took none of it. After earlier writes of the exchange, the request is
      // cut short: counted like a failed write of kj's, in an unknown state. As the exchange's
      // first write, nothing of it reached the connection (a retry may send it whatever it is),
      // and with no write completed the exchange can never count as clean.
      if (writesCompleted > 0) ++writesInFlight;
      auto e = KJ_ASSERT_NONNULL(
          kj::runCatchingExceptions([&]() { KJ_FAIL_SYSCALL("sendmsg()", error); }));
      return kj::Promise<void>(kj::mv(e));
    }
  }
  return nullptr;
}

kj::Promise<void> FramedStream::whenWriteDisconnected() {
  return raw->whenWriteDisconnected();
}

void FramedStream::shutdownWrite() {
  raw->shutdownWrite();
}

void FramedStream::abortRead() {
  raw->abortRead();
}

kj::Maybe<int> FramedStream::getFd() const {
  return raw->getFd();
}

}  // namespace sockfetch
