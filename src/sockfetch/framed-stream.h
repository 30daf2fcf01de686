#pragma once

#include <sockfetch/response-framer.h>

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/one-of.h>
#include <sys/uio.h>

namespace sockfetch {

class FramedStream final: public kj::AsyncIoStream {
  // The connection a StreamFetcher owns: the raw stream, a ResponseFramer over everything read
  // from it, and the read that watches it while it is idle. Internal to sockfetch.
  //
  // It has three modes:
  //  - idle: one single-byte read is outstanding on the raw stream. If it completes (a byte, EOF
  //    or an error) the connection is lost, and the IdleListener hears why. On a plain socket
  //    (kj's own descriptor stream, not a wrapper such as TLS) that read starts only when the
  //    event loop next has nothing else to do (one kj::evalLast() for all of a thread's streams
  //    that went idle meanwhile); until then checkIdleNow() asks the kernel, which is all a
  //    request that follows at once needs (in a loop that is never idle the connection is thus
  //    checked only when next used).
  //  - exchange (beginExchange()): the per-fetch kj::HttpClient reads and writes through this
  //    stream. Reads return only bytes of the current response (see ResponseFramer); once the
  //    response is over they never complete. The idle read is never cancelled (it may hold a
  //    byte already): the exchange adopts it as the first read of the response. Before a byte of
  //    the request is written, the connection is checked once more (see beginExchange()).
  //  - pass-through (passThrough()): after an upgrade, or once released to the caller, reads
  //    return every byte: first the ones buffered (and the idle read's byte, if it got one), then
  //    the raw stream's.
  //
  // Single-threaded. At most one read and one write may be outstanding at a time, like any
  // kj::AsyncIoStream.

public:
  class IdleListener {
  public:
    virtual void idleConnectionLost(bool gotBytes, kj::String reason) = 0;
    // Called from the idle read's continuation: `gotBytes` if the server sent something, else it
    // closed the connection (or reading it failed). Must not destroy the FramedStream
    // synchronously.
  };

  FramedStream(kj::Own<kj::AsyncIoStream> raw, ResponseFramer::Limits limits,
      kj::Maybe<kj::Timer&> timer);
  // `timer`, if any, lets a request on a stream other than a plain socket wait for the event loop
  // to read what the kernel already holds for it (see beginExchange()).
  ~FramedStream() noexcept(false);
  KJ_DISALLOW_COPY(FramedStream);

  bool hasCarriedExchange() const { return carriedExchange; }
  // Whether an exchange ended on this connection (under this stream, or under the one a
  // StreamFetcher released it from).

  void watchIdle(IdleListener& listener);
  // Enters idle mode: starts the idle read and reports to `listener` (which must outlive this
  // stream or the next beginExchange()/passThrough()) if it completes.

  struct IdleLoss {
    bool gotBytes;  // the server sent something; otherwise it closed (or the connection failed)
    kj::String reason;
    bool serverSpokeFirst = false;
    // The bytes came before this stream carried any exchange: the server spoke first, which an
    // HTTP/1.1 server never does (SSH, SMTP, a TLS server...; or a proxy that sent more than
    // its answer to CONNECT). `reason` says to check the upstream's address, not to retry.
  };

  kj::Maybe<IdleLoss> checkIdleNow();
  // Checks, synchronously, whether the idle connection is still usable. On a plain socket this
  // asks the kernel (without consuming anything), so bytes or EOF that the event loop has not
  // reported yet are seen too. Call right before beginExchange(); null means go ahead.

  void beginExchange(kj::HttpMethod method);
  // Enters exchange mode for a request with this method. If the idle read had started, the
  // exchange's first read or write first lets the event loop turn until an idle read that
  // completed has reported it (one turn on a plain socket, which is then asked again; several
  // on other streams, and, with a timer, one poll for input the kernel already holds). If the
  // connection was lost while idle, that read or write fails (DISCONNECTED) with nothing
  // written, and getGateLoss() says why.

  kj::Maybe<const IdleLoss&> getGateLoss() const { return gateLoss; }
  // Why the current exchange was refused before writing anything, if it was.

  kj::Promise<void> finishResponse();
  // Once the consumer has read the response body to its end: reads whatever of the response the
  // consumer never sees (chunked trailers, the final CRLF) until the response is complete.

  void passThrough();
  // Enters pass-through mode (see above). Bytes already buffered are kept and read first.

  void refuseWrites(kj::String message);
  // This connection will never carry another exchange: every later write fails (DISCONNECTED,
  // with `message`, which says what happened and what to do). Reads go on, for a response still
  // coming. The first call's message stands.

  kj::Maybe<kj::Exception> writeRefusal();
  // The error every write gets since refuseWrites(), or null.

  void shutdownNow();
  // For a connection that will never be used again but is still referenced (a request body a
  // caller keeps writing, a response body the caller keeps): shuts the socket down, so that the
  // server sees it closed now rather than when the last reference goes. Pending reads and writes
  // end as the socket's do (EOF, an error); nothing is destroyed. A stream without a descriptor
  // has its write side shut down instead (which its peer reads as the end), a write still
  // pending dropped first (it fails).

  class ExchangeView;
  // The stream to build an exchange's kj::HttpClient over (see below).

  void setBodyBuffer(kj::ArrayPtr<kj::byte> buffer) { bodyBuffer = buffer; }
  // The buffer of the consumer's response body read in progress (null when none). kj-http reads
  // on after a response, into its own buffer (those reads wait forever), but a read into the
  // consumer's buffer that needs bytes past the end of the response means kj-http and the framer
  // disagree where the body ends: that read fails instead of waiting forever.

  ResponseFramer& getFramer() { return framer; }
  bool readWasCancelled() const { return readCancelled; }
  // The response failed because a read of it was cancelled (see rawReadOutstanding): the
  // consumer's doing, not the server's.
  uint64_t getWritesInFlight() const { return writesInFlight; }
  uint64_t getWritesCompleted() const { return writesCompleted; }
  bool sawChunkedTerminator() const { return chunkedTerminatorWritten; }
  // Write bookkeeping for the current exchange, so the fetcher can tell that the whole request
  // (the chunked body's terminator included) reached the connection.

  // kj::AsyncIoStream
  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  kj::Promise<void> whenWriteDisconnected() override;
  void shutdownWrite() override;
  void abortRead() override;
  kj::Maybe<int> getFd() const override;

private:
  enum class Mode { IDLE, EXCHANGE, PASS_THROUGH };
  struct ProbePending {};
  struct ProbeGotByte {};
  struct ProbeGotEof {};
  using ProbeOutcome = kj::OneOf<ProbePending, ProbeGotByte, ProbeGotEof, kj::Exception>;

  kj::Own<kj::AsyncIoStream> raw;
  ResponseFramer framer;
  kj::Maybe<kj::Timer&> timer;
  bool plainSocket;  // kj's own socket stream: the kernel can be asked what it holds
  bool hasFd;        // the stream has a descriptor (a socket, or a wrapper that exposes one)
  kj::Maybe<kj::String> refusal;  // the message of refuseWrites()
  bool shutDown = false;
  kj::Maybe<ExchangeView&> currentView;  // the newest view, while it may touch this stream
  Mode mode = Mode::PASS_THROUGH;
  bool carriedExchange = false;  // an exchange ended and the stream went idle again
  bool rawEof = false;

  // Idle watching.
  kj::byte probeByte = 0;
  kj::Maybe<ProbeOutcome> probeOutcome;  // null when no idle read is outstanding or unread
  kj::Maybe<IdleListener&> idleListener;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> probeWaiter;
  kj::Maybe<kj::Promise<void>> probe;  // declared after what its continuation touches
  class ProbeStarter;
  kj::Own<ProbeStarter> probeStarter;  // plain sockets only: starts `probe` once the loop is idle
  FramedStream* nextToProbe = nullptr;   // in probeStarter's list while the idle read is due:
  FramedStream** linkToProbe = nullptr;  // the link that points here (null when not listed)

  // Exchange.
  bool gatePassed = true;
  kj::Maybe<kj::ForkedPromise<void>> gate;
  kj::Maybe<IdleLoss> gateLoss;
  uint64_t writesInFlight = 0;
  uint64_t writesCompleted = 0;
  bool chunkedTerminatorWritten = false;
  kj::ArrayPtr<kj::byte> bodyBuffer;
  bool readCancelled = false;  // the response failed for a cancelled read
  bool rawReadOutstanding = false;
  // A raw read of a response was started and its continuation has not run. Set when the next one
  // starts, the last was cancelled (its consumer gave up on a read): kj's streams read as soon as
  // bytes are there, in the call or in an event before the continuation's, so it may have taken
  // bytes nobody counted, and the framer no longer knows where the response ends. Whether it did
  // cannot be told, so the response fails either way. (Keeping the read running for the next one
  // to adopt, as the idle read is, would tell; it costs a fulfiller and an eager node per read.)

  kj::Canceler rawWrites;  // writes in flight on a stream without a descriptor (see shutdownNow())

  kj::Canceler gateCanceler;
  // Cancels a gate still settling when the stream is destroyed (a read or write may hold a branch
  // of it longer). Last, so that it goes first.

  void detachView();
  void startProbe();
  void probeDone();
  kj::Maybe<IdleLoss> probeLoss();
  // What the idle read found, if it completed.
  kj::Maybe<IdleLoss> peekSocket();
  IdleLoss endedWhileIdle(kj::StringPtr error) const;
  // The loss for the idle connection closed (`error` empty) or failed with `error`: said of a
  // connection that never carried a request as such.
  IdleLoss unsolicited(kj::ArrayPtr<const char> seen);
  // The loss for bytes that came while idle, `seen` being (the start of) them.
  kj::Promise<void> passGate();
  kj::Promise<void> settleGate(bool mayWaitForInput);
  void checkGate();
  [[noreturn]] void failGate(IdleLoss loss);
  kj::Promise<void> awaitProbe();
  ProbeOutcome takeProbe();
  kj::Promise<size_t> readLoop(kj::byte* buffer, size_t minBytes, size_t maxBytes, size_t done);
  kj::Promise<size_t> passThroughRead(kj::byte* buffer, size_t minBytes, size_t maxBytes);
  kj::Promise<void> fill();
  kj::Promise<void> fillFromRaw();
  kj::Promise<size_t> readRaw();
  // Reads from the raw stream into the framer's space; then call receivedRaw().
  kj::Promise<size_t> startRawRead(kj::byte* into, size_t maxBytes);
  // Every read of the raw stream during an exchange. Its continuation must clear
  // `rawReadOutstanding` before anything else (see there).
  void receivedRaw(size_t n);
  // Tells the framer about `n` bytes a raw read put in its space (0: the end of the stream).
  kj::Exception rawReadFailed(kj::Exception&& e);
  // What a failed raw read means for the response.
  kj::Promise<void> trackWrite(kj::Promise<void> promise, bool isTerminator);
  kj::Maybe<kj::Promise<void>> sendNow(const struct iovec* iov, size_t count, size_t total,
      bool isTerminator, size_t& sent);
  // Sends on a plain socket what the kernel takes without waiting, and sets `sent` to how much
  // (0 for a stream that is not a plain socket, or while a write of kj's is pending). Returns the
  // write's outcome, bookkept, if it ended here: all of it sent, or the socket reported an error;
  // null if the rest is kj's to write.
};

class FramedStream::ExchangeView final: public kj::AsyncIoStream {
  // An exchange's window on a FramedStream, to build that exchange's kj::HttpClient over. It
  // forwards to the stream until the exchange is over (the stream's watchIdle(), passThrough() or
  // destruction, or a newer view); after that its reads never complete and its writes fail, so a
  // kj::HttpClient kept alive past its exchange (to keep its response headers valid) can never
  // touch a later exchange's bytes. May outlive the stream; must not move.

public:
  explicit ExchangeView(FramedStream& stream);
  ~ExchangeView() noexcept(false);
  KJ_DISALLOW_COPY(ExchangeView);

  void detach() { stream = nullptr; }

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  kj::Promise<void> whenWriteDisconnected() override;
  void shutdownWrite() override;
  void abortRead() override;

private:
  kj::Maybe<FramedStream&> stream;

  FramedStream& get();
};

}  // namespace sockfetch
