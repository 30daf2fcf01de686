#pragma once
// Test helpers for sockfetch: a scripted HTTP peer over either an in-process pipe or a real
// loopback TCP connection, so that each behaviour is checked on both transports.

#include <sockfetch/kj-compat.h>

#include <kj/async-io.h>
#include <kj/debug.h>
#include <kj/compat/http.h>
#include <kj/string.h>
#include <kj/test.h>
#include <kj/vector.h>

namespace sockfetch {
namespace test {

class Peer {
  // The server side of one connection, driven by the test: reads what the client wrote and
  // writes scripted bytes back.
public:
  Peer(kj::WaitScope& waitScope, kj::Own<kj::AsyncIoStream> stream)
      : waitScope(waitScope), stream(kj::mv(stream)) {}

  kj::String readRequest();
  // Reads one request head (through the blank line) plus a body if the head announces one by
  // Content-Length or chunked encoding (the body is returned de-chunked after the head).

  kj::String readHead();
  // Reads through the end of the next header block.

  kj::String readExactly(size_t n);

  void send(kj::StringPtr bytes);
  // Writes the bytes and waits until written.

  kj::Promise<void> sendLater(kj::StringPtr bytes);
  // Starts writing; the caller waits on the returned promise (needed for unbuffered pipes).

  bool readWouldBlock();
  // True if nothing at all was written by the client (and it did not close): checks without
  // consuming anything that is buffered.

  bool sawEof();
  // Runs the event loop until the client's side is read to its end; true if it ended (closed)
  // without sending more bytes.

  void close() { stream = nullptr; }
  kj::AsyncIoStream& getStream() { return *stream; }

private:
  kj::WaitScope& waitScope;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Vector<char> buffer;

  void fillAtLeast(size_t n);
  bool tryFill();
};

struct LoopEnv {
  // An event loop with its timer and a header table, for a test's Env to derive from, and waits
  // that fail the test rather than hang: a wait that reaches `limit` found a hang.
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::WaitScope& ws = io.waitScope;
  kj::Timer& timer = io.provider->getTimer();
  kj::HttpHeaderTable table;
  kj::StringPtr host = "upstream.test";
  kj::Duration limit = 2 * kj::SECONDS;

  kj::HttpHeaders headers() {
    // Request headers naming `host`.
    kj::HttpHeaders h(table);
    h.set(kj::HttpHeaderId::HOST, host);
    return h;
  }

  template <typename T>
  T bounded(kj::Promise<T> promise) {
    // Waits for `promise`, failing the test instead of hanging.
    return promise.exclusiveJoin(timer.afterDelay(limit).then([]() -> T {
      KJ_FAIL_ASSERT("timed out: the library hung");
    })).wait(ws);
  }

  void bounded(kj::Promise<void> promise) {
    promise.exclusiveJoin(timer.afterDelay(limit).then([]() {
      KJ_FAIL_ASSERT("timed out: the library hung");
    })).wait(ws);
  }

  template <typename T>
  kj::Exception failureOf(kj::Promise<T> promise) {
    // Waits (bounded) for `promise` to fail, and returns why; success fails the test.
    auto outcome = promise.then([](T&&) -> kj::Maybe<kj::Exception> { return nullptr; },
        [](kj::Exception&& e) -> kj::Maybe<kj::Exception> { return kj::mv(e); });
    KJ_IF_SOME(e, bounded(kj::mv(outcome))) {
      return kj::mv(e);
    }
    KJ_FAIL_ASSERT("expected a failure, but it succeeded");
  }

  void settle(kj::Duration d = 20 * kj::MILLISECONDS) {
    // Lets deferred closes and the peer's reactions happen.
    timer.afterDelay(d).wait(ws);
  }

  template <typename Func>
  void waitFor(Func&& condition) {
    // Runs the event loop until `condition()` holds, or `limit` passes (the caller then checks).
    auto deadline = timer.now() + limit;
    while (!condition() && timer.now() < deadline) {
      timer.afterDelay(1 * kj::MILLISECONDS).wait(ws);
    }
  }

  bool drainsToEnd(Peer& peer);
  // Reads (and drops) everything the client still sends until it closes (FIN or RST), within
  // `limit`; false if it did not close by then.
};

void resetConnection(Peer& peer);
// Closes the peer's socket with SO_LINGER 0, so that the kernel sends RST instead of FIN.

void noDelay(Peer& peer);
// TCP_NODELAY: each small write leaves as its own segment, so trickled bytes really arrive apart.

bool contains(kj::StringPtr haystack, kj::StringPtr needle);

template <typename T>
void forget(kj::Vector<T*>& list, T* item) {
  // Removes `item` from an unordered list of live objects (the last one takes its place).
  for (size_t i = 0; i < list.size(); i++) {
    if (list[i] == item) {
      list[i] = list.back();
      list.removeLast();
      return;
    }
  }
}

kj::Promise<void> trickle(kj::AsyncIoStream& out, kj::Timer& timer, kj::StringPtr bytes);
// Writes `bytes` one byte per write, a little apart. `bytes` must outlive the promise.

struct Transport {
  // A connected pair: `client` for the code under test, `peer` for the script.
  kj::Own<kj::AsyncIoStream> client;
  kj::Own<kj::AsyncIoStream> server;
};

Transport pipeTransport();
Transport tcpTransport(kj::AsyncIoContext& io);
// A real loopback TCP connection (127.0.0.1, ephemeral port).

struct PipeProxyEnv: public LoopEnv {
  // Connections to proxies over in-process pipes, for tunnelConnector(): each call of toProxy()'s
  // connector adds the proxy's end, as a Peer, to `proxies`.
  kj::Vector<kj::Own<Peer>> proxies;
  unsigned calls = 0;

  kj::Function<kj::Promise<kj::Own<kj::AsyncIoStream>>()> toProxy() {
    return [this]() {
      ++calls;
      auto t = pipeTransport();
      proxies.add(kj::heap<Peer>(ws, kj::mv(t.server)));
      return kj::Promise<kj::Own<kj::AsyncIoStream>>(kj::mv(t.client));
    };
  }
};

kj::Promise<void> readHeadInto(kj::AsyncIoStream& stream, kj::Vector<char>& buffer);
// Reads from `stream` into `buffer` until it holds a whole request head (up to its blank line).
// `stream` and `buffer` must outlive the promise.

kj::Maybe<kj::Exception> failureIfAny(LoopEnv& env, kj::Promise<void> promise);
// Waits (bounded by env.limit) for `promise`: null if it succeeded, else why it failed (a hang
// is a failure too: "timed out").

kj::Maybe<size_t> bytesBeforeEnd(LoopEnv& env, kj::AsyncIoStream& stream);
// Reads what the other side still sends until its side ends (FIN, reset, or a pipe's end): how
// many bytes came, or null if it did not end within env.limit.

class Rng {
  // A deterministic PRNG (splitmix64), for seeded generated tests.
public:
  explicit Rng(uint64_t seed): state(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint32_t below(uint32_t n) { return n == 0 ? 0 : uint32_t(next() % n); }
  bool chance(unsigned percent) { return below(100) < percent; }
  template <typename T, size_t N>
  const T& pick(const T (&a)[N]) { return a[below(N)]; }

private:
  uint64_t state;
};

kj::Own<kj::AsyncIoStream> tlsLike(kj::Own<kj::AsyncIoStream> inner);
// Wraps a stream the way kj's TLS stream behaves where it matters to sockfetch: it exposes the
// inner descriptor (whose bytes are not its bytes), reads ahead into a buffer of its own, and
// reports each read two events after the inner read that got its bytes.

kj::String webSocketAccept(kj::StringPtr key);
// The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455), for scripted handshakes.

class ScriptedServer {
  // A loopback HTTP/1.1 server whose every answer is scripted by the test, serving many
  // connections at once. It checks that clients never pipeline: a byte that arrives while a
  // response is being prepared, or beyond the end of a request, is counted in `pipelined`.
public:
  struct Reply {
    kj::String bytes;             // written as is (may be empty)
    kj::Duration delay = 0 * kj::MILLISECONDS;  // before writing
    bool closeAfter = false;      // close the connection after writing
    kj::String thenUnsolicited;   // written a little after the reply, while idle
  };
  using Handler = kj::Function<Reply(unsigned connection, unsigned request, kj::StringPtr text)>;
  // `connection` counts from 0 in accept order; `request` from 0 on that connection; `text` is
  // the request head and body.

  ScriptedServer(kj::AsyncIoContext& io, kj::StringPtr address, Handler handler);
  // `address`: "127.0.0.1" (an ephemeral port is chosen), "unix:/path", or "unix" (a unix socket
  // in a new private directory, removed with the server).
  ~ScriptedServer() noexcept(false);

  kj::Own<kj::NetworkAddress> address();
  // Where clients connect.

  void closeIdleConnections();
  // Closes every connection that is waiting for its next request.

  unsigned accepted = 0;
  unsigned served = 0;
  unsigned pipelined = 0;
  unsigned open = 0;        // connections currently open
  unsigned maxBusy = 0;     // most requests being answered at once
  unsigned busy = 0;

private:
  struct Connection;
  kj::AsyncIoContext& io;
  Handler handler;
  kj::String addressText;
  kj::Maybe<kj::String> unixDirectory;  // for "unix"
  kj::Own<kj::ConnectionReceiver> listener;
  kj::Vector<Connection*> connections;
  kj::Own<kj::TaskSet::ErrorHandler> errorHandler;
  kj::TaskSet tasks;

  kj::Promise<void> acceptLoop();
  kj::Promise<void> serve(Connection& connection);
};

ScriptedServer::Reply ok(kj::StringPtr body, kj::StringPtr extraHeaders = "");
// A 200 reply with `body`, framed by Content-Length, after `extraHeaders` (each ending in CRLF).

kj::String pathOf(kj::StringPtr request);
// The path in a request's first line.

template <typename Pool>
void expectEveryConnectionCounted(kj::WaitScope& ws, const Pool& pool,
    const unsigned& liveStreams) {
  // For a ConnectionPool with nothing in flight, after a settle: every connection it opened is
  // open (and idle) or counted once under a drop reason, and the sockets it holds (`liveStreams`,
  // counted by the test's connector, and read only after what follows) are exactly those it
  // counts. First lets the closes that events of this tick deferred (the pool stops counting a
  // connection within the event that drops it, and closes it a turn later) happen.
  for (int i = 0; i < 3; i++) kj::evalLater([]() {}).wait(ws);
  auto& s = pool.getStats();
  KJ_EXPECT(pool.getWaitingCount() == 0, pool.getWaitingCount());
  KJ_EXPECT(pool.getOpenCount() == liveStreams, "getOpenCount() drifted from the sockets held",
      pool.getOpenCount(), liveStreams);
  KJ_EXPECT(pool.getIdleCount() == pool.getOpenCount(), pool.getIdleCount(), pool.getOpenCount());
  KJ_EXPECT(s.connectionsOpened == pool.getOpenCount() + s.dropped(),
      "a connection was dropped uncounted, or counted twice", s.connectionsOpened,
      pool.getOpenCount(), s.dropped());
}

}  // namespace test
}  // namespace sockfetch

#define SOCKFETCH_TRANSPORT_CASE(Env, name, suffix, description, label, args) \
  class name##suffix: public ::kj::TestCase { \
  public: \
    name##suffix(): ::kj::TestCase(__FILE__, __LINE__, description " (" label ")") {} \
    void run() override { \
      Env env args; \
      name(env); \
    } \
  } name##suffix##Instance;
// One KJ test running `name` on an `Env` constructed with `args` (a parenthesised list).

#define SOCKFETCH_TRANSPORT_PAIR(Env, name, description, pipeLabel, pipeArgs, tcpLabel, tcpArgs) \
  void name(Env& env); \
  SOCKFETCH_TRANSPORT_CASE(Env, name, OnPipe, description, pipeLabel, pipeArgs) \
  SOCKFETCH_TRANSPORT_CASE(Env, name, OnTcp, description, tcpLabel, tcpArgs) \
  void name(Env& env)
// Defines one behaviour, the body that follows, as two KJ tests: one on an `Env` constructed with
// `pipeArgs`, one with `tcpArgs`; the labels end their names.
