#pragma once

#include <sockfetch/connector.h>
#include <sockfetch/stream-fetcher.h>

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/timer.h>
#include <kj/vector.h>

namespace sockfetch {

class ConnectionPool final: public kj::HttpClient {
  // An HTTP/1.1 client for one upstream that owns many StreamFetchers, one connection each, and
  // never puts two requests on one connection.
  //
  // A request takes the most recently used idle connection, else opens a new one (up to
  // Settings::maxConnections), else waits in a bounded queue. The connection comes back to the
  // pool when its StreamFetcher gives it back (response body read to its end, connection clean);
  // anything else drops it, and the drop is counted by reason (getStats()). Idle connections are
  // watched by their fetchers: the server closing one, or sending anything on it, removes it.
  //
  // Retry: a request that fails on a *reused* connection before any byte of a response arrived
  // (the stale keep-alive race: the server closed the connection as the request went out) is
  // sent once more on a new connection when that is safe: the request never reached the
  // connection at all (with a body the pool does not buffer, only when the connection was found
  // lost before the request started, so that none of the body was taken), or its method is
  // idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) and the pool can replay its body (none,
  // or one of known size up to Settings::maxReplayBodyBytes, which the pool then buffers before
  // sending). Never twice, and never a POST whose bytes reached the server. A connection found
  // closed (or poisoned) while idle, after sitting idle in the pool, as a request goes out on it,
  // before anything is written, is no failure: the request simply takes another connection, not
  // counted as a retry (nor as a reuse) - a streamed body too, unless a write already went to
  // the lost connection (that write failed, so the request does too).
  //
  // Lifetimes: the timer and (for the address constructor) the address must outlive the pool,
  // the header table the pool and every response. Requests, responses and bodies may outlive
  // it: destroying the pool fails requests not yet sent (DISCONNECTED, "the ConnectionPool was
  // destroyed") and lets requests already sent finish, after which their connections close (one
  // that fails is then not retried).
  //
  // Single-threaded, like everything in KJ: use it on one event loop, and destroy it (with its
  // responses and bodies) before that event loop.

public:
  struct Settings {
    unsigned maxConnections = 64;
    // Connections open at once (busy + idle + being opened); at least 1 (the constructor throws
    // otherwise). A failed exchange's connection counts until it is closed (once its response is
    // over); an upgraded one (101) leaves the pool, and no longer counts.
    unsigned maxIdleConnections = 32;
    // Idle connections kept; a connection coming back to a full idle set is closed (0: none is
    // kept; one coming back still goes straight to a request already waiting for one; neverReuse
    // uses each connection once).
    kj::Duration idleTimeout = 60 * kj::SECONDS;
    // An idle connection unused this long is closed (kj::maxValue: never). The three timeouts
    // may not be negative (the constructor throws); 0 means at once (a connection coming back
    // still goes straight to a request already waiting for one).
    uint64_t maxRequestsPerConnection = 0;
    // A connection that served this many requests is closed instead of reused (0: no limit).
    unsigned maxWaiting = 1024;
    // Requests that may wait for a connection when all are busy. Past it (or at 0): OVERLOADED
    // at once.
    kj::Duration waitTimeout = 30 * kj::SECONDS;
    // A request that waited this long for a connection fails with OVERLOADED (kj::maxValue:
    // never).
    kj::Duration connectTimeout = 10 * kj::SECONDS;
    // Opening a connection that takes longer fails (OVERLOADED, as kj's own timeouts do: try
    // later; kj::maxValue: never).
    bool neverReuse = false;
    // Close every connection after one request: for upstreams not trusted to frame responses
    // correctly. Requests are still never pipelined.
    size_t maxReplayBodyBytes = 64 * 1024;
    // Request bodies of known size up to this are buffered so that a retry can replay them (0:
    // none is; a request with a body is then sent again only if none of it was taken).
    kj::StringPtr upstreamName = nullptr;
    // How errors name the upstream (copied when the pool is made): say "origin.test:443 through
    // proxy.internal:3128" for a pool over a tunnelConnector(). Null: the address, for the address
    // constructor; nothing, for a connector.
    StreamFetcher::Settings fetcher;
    // Passed to every StreamFetcher.
  };

  struct Stats {
    uint64_t connectionsOpened = 0;  // connections established
    uint64_t connectFailures = 0;    // connection attempts that failed or timed out
    uint64_t requests = 0;           // request() and openWebSocket() calls
    uint64_t reuses = 0;             // requests sent on a connection that had served one before
    uint64_t retries = 0;            // requests sent a second time (see above)
    uint64_t waits = 0;              // requests that had to wait for a connection
    uint64_t overloaded = 0;         // requests refused: queue full or waited too long

    // Connections dropped, by reason:
    uint64_t droppedPeerClosedIdle = 0;   // the server closed an idle connection
    uint64_t droppedPeerClosedNew = 0;    // the server closed (or reset) a new connection before
                                          // its first request: it may be at a connection limit
    uint64_t droppedUnsolicitedBytes = 0; // bytes nobody asked for (poisoned connection)
    uint64_t droppedConnectionClose = 0;  // the server sent `Connection: close`
    uint64_t droppedNotReusable = 0;      // HTTP/1.0, body delimited by close, bad framing
    uint64_t droppedUpgraded = 0;         // 101 (WebSocket)
    uint64_t droppedAbandoned = 0;        // a body dropped early, a request or read cancelled
    uint64_t droppedRequestIncomplete = 0;// response ended before the request was sent
    uint64_t droppedStale = 0;            // a reused connection failed before any response byte:
                                          // the server had closed it (the keep-alive race)
    uint64_t droppedFailed = 0;           // any other failed exchange (I/O error, malformed
                                          // response)
    uint64_t droppedIdleTimeout = 0;      // idle longer than Settings::idleTimeout
    uint64_t droppedIdleLimit = 0;        // more idle connections than Settings allows
    uint64_t droppedMaxRequests = 0;      // served Settings::maxRequestsPerConnection
    uint64_t droppedNeverReuse = 0;       // Settings::neverReuse
    uint64_t droppedForRetry = 0;         // closed to make room for a retry's new connection

    uint64_t dropped() const {
      // Connections dropped, all reasons together.
      return droppedPeerClosedIdle + droppedPeerClosedNew + droppedUnsolicitedBytes +
          droppedConnectionClose + droppedNotReusable + droppedUpgraded + droppedAbandoned +
          droppedRequestIncomplete + droppedStale + droppedFailed + droppedIdleTimeout +
          droppedIdleLimit + droppedMaxRequests + droppedNeverReuse + droppedForRetry;
    }
  };

  ConnectionPool(kj::Timer& timer, const kj::HttpHeaderTable& table, Connector connector,
      Settings settings);
  ConnectionPool(kj::Timer& timer, const kj::HttpHeaderTable& table, Connector connector)
      : ConnectionPool(timer, table, kj::mv(connector), Settings()) {}
  ConnectionPool(kj::Timer& timer, const kj::HttpHeaderTable& table, kj::NetworkAddress& address,
      Settings settings);
  ConnectionPool(kj::Timer& timer, const kj::HttpHeaderTable& table, kj::NetworkAddress& address)
      : ConnectionPool(timer, table, address, Settings()) {}
  // `connector` opens new connections (see connector.h: an address, a unix socket, a CONNECT
  // tunnel through a proxy, or anything that yields a stream). `timer` is the event loop's own
  // (kj::AsyncIoProvider::getTimer()): it drives the pool's timeouts and, unless
  // settings.fetcher.timer says otherwise, its connections' (StreamFetcher::Settings::timer).

  ~ConnectionPool() noexcept(false);
  KJ_DISALLOW_COPY(ConnectionPool);

  Request request(kj::HttpMethod method, kj::StringPtr url, const kj::HttpHeaders& headers,
      kj::Maybe<uint64_t> expectedBodySize = nullptr) override;
  // Sends the request on a pooled connection. `url` and `headers` are copied; a `url` that is
  // empty or has a space or a control character, or a header with an empty name, throws at once
  // (FAILED). The response promise fails with OVERLOADED if the pool is saturated or opening a
  // connection timed out (see Settings), with the connector's error (naming the address) if none
  // could be opened, or with the exchange's error. The request body may be written at once; its
  // writes complete once a connection carries them (or, for a replayable body, once buffered).

  kj::Promise<WebSocketResponse> openWebSocket(
      kj::StringPtr url, const kj::HttpHeaders& headers) override;
  // Like request() (a handshake is retried like a GET); a 101 takes the connection out of the
  // pool for good.

  const Stats& getStats() const { return stats; }
  unsigned getIdleCount() const { return idle.size(); }
  unsigned getOpenCount() const { return all.size() + connecting; }
  // Connections open or being opened (busy + idle + connecting).
  unsigned getWaitingCount() const { return waiters.size(); }

private:
  class Life;
  class Connection;
  class Waiter;
  class Attempt;
  class WebSocketAttempt;
  class PendingBody;
  class ConnectSlot;

  template <typename T>
  class Chain {
    // A list of objects that link themselves in (each T has a `ChainLink<T> chainLink`; see
    // pool.c++), oldest first. Adding, removing any one and reaching either end cost the same
    // however long the list is: a pool may hold thousands of idle connections or waiting
    // requests, and they may all expire or close in one event. It holds no references; its users
    // keep what is linked alive, and unlink it before it goes.
  public:
    bool empty() const { return count == 0; }
    unsigned size() const { return count; }
    T& oldest() { return *first; }
    T& newest() { return *last; }
    void add(T& item);     // as the newest
    void addOlderThan(T& newer, T& item);  // just before `newer`, which is linked here
    void remove(T& item);  // which must be linked here

  private:
    T* first = nullptr;
    T* last = nullptr;
    unsigned count = 0;
  };

  kj::Own<Life> life;                       // tells attempts in flight whether the pool exists
  kj::Timer& timer;
  const kj::HttpHeaderTable& table;
  Connector connector;
  kj::String upstreamName;                  // " (name)" (see Settings::upstreamName), or ""
  Settings settings;
  Stats stats;
  unsigned connecting = 0;
  bool sweepScheduled = false;
  kj::Vector<Connection*> all;              // every connection the pool counts (idle, busy,
                                            // handed out), each knowing its index here
  Chain<Connection> idle;                   // reused newest first, expired oldest first
  Chain<Waiter> waiters;                    // served oldest first
  kj::Canceler canceler;                    // waits for a connection (they touch the pool)
  kj::Own<kj::TaskSet::ErrorHandler> errorHandler;
  kj::TaskSet tasks;                        // deferred closes, connects for waiters

  kj::HttpClient::Request sendBodilessNow(kj::HttpMethod method, kj::StringPtr url,
      const kj::HttpHeaders& headers, kj::Maybe<uint64_t> expectedBodySize,
      kj::Own<Connection> connection);
  // The usual request: no body, and an idle connection ready. Sent at once with the caller's
  // headers; an Attempt (see pool.c++) is made only to send it again.
  kj::Promise<kj::Own<Connection>> acquire(bool fresh);
  kj::Maybe<kj::Own<Connection>> takeIdle();
  kj::Promise<kj::Own<Connection>> connect();
  void connectionIdle(Connection& connection, bool keepIdleSince = false);
  void connectionClosed(Connection& connection);
  void readopt(kj::Own<StreamFetcher> fetcher, uint64_t uses, kj::TimePoint idleSince);
  void addIdle(Connection& connection);
  kj::Own<Connection> removeIdle(Connection& connection);
  void closeOldestIdle(uint64_t Stats::*counter);
  void retire(Connection& connection, uint64_t Stats::*counter);
  void dispose(kj::Own<Connection> connection);
  void serveWaiters();
  void scheduleSweep();
  void connectFor(kj::Own<kj::PromiseFulfiller<kj::Own<Connection>>> fulfiller);
  void countClose(StreamFetcher::CloseKind kind);
  void uncountUse(Connection& connection);
  kj::Exception sayFailure(Connection& connection, kj::Exception&& e);
};

}  // namespace sockfetch
