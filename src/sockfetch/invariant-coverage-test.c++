// Guard and pool invariants from DESIGN.md that the other suites left untested on one transport
// (found by mutating the library), each on an in-process pipe and on real loopback TCP.
//  - The pool: a request is sent again at most once, only when it can be replayed, never a POST
//    whose bytes reached the server, and every dropped connection is counted under its reason.
//    (The other pool suites drive a ScriptedServer, which is TCP or unix sockets only.)
//    A 101 takes its connection out of the pool, counted as upgraded.
//  - The guard: release() after the idle watch started (on a socket too) keeps the byte that
//    watch read.

#include "pool.h"

#include <sockfetch/fetcher-env.h>
#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>

namespace sockfetch {
namespace {

using test::OK_HELLO;
using test::Peer;

struct PoolEnv: public test::LoopEnv {
  // A ConnectionPool whose connector opens pipes or loopback TCP connections; the test drives the
  // server end of each through a Peer, in the order they were opened.
  bool tcp;
  kj::Vector<kj::Own<kj::AsyncIoStream>> clients;  // the pool's ends, handed out in order
  kj::Vector<kj::Own<Peer>> peers;                 // the server ends
  unsigned deadFrom = 1000;    // connections from this index on are closed by the server at once
  unsigned refuseFrom = 1000;  // connects from this index on fail
  unsigned connects = 0;
  kj::Own<ConnectionPool> pool;

  explicit PoolEnv(bool tcp, ConnectionPool::Settings settings = {}): tcp(tcp) {
    // Connections are made up front: making a loopback TCP pair waits on the event loop, which a
    // connector (called from within it) must not do.
    for (unsigned i = 0; i < 4; i++) {
      auto transport = tcp ? test::tcpTransport(io) : test::pipeTransport();
      clients.add(kj::mv(transport.client));
      peers.add(kj::heap<Peer>(ws, kj::mv(transport.server)));
    }
    pool = kj::heap<ConnectionPool>(timer, table, [this]() { return connect(); },
        kj::mv(settings));
  }

  kj::Promise<kj::Own<kj::AsyncIoStream>> connect() {
    auto index = connects++;
    if (index >= refuseFrom || index >= clients.size()) {
      return KJ_EXCEPTION(DISCONNECTED, "test: connection refused");
    }
    if (index >= deadFrom) peers[index]->close();
    return kj::mv(clients[index]);
  }

  Peer& peer(unsigned i) {
    // The server end of the i-th connection the pool opened (waits, bounded, for it to open).
    waitFor([&]() { return connects > i; });
    KJ_ASSERT(connects > i, "the pool never opened connection", i);
    return *peers[i];
  }

  void serveFirst() {
    // One GET answered on connection 0, which then idles in the pool (a later request reuses it).
    auto request = pool->request(kj::HttpMethod::GET, "/first", headers());
    request.body = nullptr;
    auto text = peer(0).readRequest();
    KJ_EXPECT(text.startsWith("GET /first "), text);
    auto written = peer(0).sendLater(OK_HELLO);
    auto response = bounded(kj::mv(request.response));
    KJ_EXPECT(bounded(response.body->readAllText()) == "hello");
    bounded(kj::mv(written));
    KJ_EXPECT(pool->getIdleCount() == 1);
  }

  void expectFailsNotResent(kj::Promise<void> bodyWritten, kj::HttpClient::Request& request) {
    // Once the request and its body reached connection 0, the server closes it without an
    // answer: the request fails, and is not sent again on another connection.
    bounded(kj::mv(bodyWritten));
    request.body = nullptr;
    peer(0).close();
    auto e = failureOf(kj::mv(request.response));
    KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
    settle();
    KJ_EXPECT(connects == 1, "the request was sent again", connects);
    KJ_EXPECT(pool->getStats().retries == 0);
  }
};

#define BOTH_TRANSPORTS(name, description) \
  SOCKFETCH_TRANSPORT_PAIR(PoolEnv, name, description, "pipe", (false), "tcp", (true))

ConnectionPool::Settings smallReplay() {
  ConnectionPool::Settings settings;
  settings.maxReplayBodyBytes = 8;
  return settings;
}

BOTH_TRANSPORTS(staleGetRetriedOnce,
    "a GET that meets a stale reused connection is sent once more, on a new connection, and the "
    "drop is counted as stale") {
  env.serveFirst();
  auto request = env.pool->request(kj::HttpMethod::GET, "/second", env.headers());
  request.body = nullptr;
  KJ_EXPECT(env.peer(0).readRequest().startsWith("GET /second "));
  env.peer(0).close();  // the keep-alive race: the server closed as the request went out
  auto text = env.peer(1).readRequest();
  KJ_EXPECT(text.startsWith("GET /second "), text);
  auto written = env.peer(1).sendLater(OK_HELLO);
  auto response = env.bounded(kj::mv(request.response));
  KJ_EXPECT(env.bounded(response.body->readAllText()) == "hello");
  env.bounded(kj::mv(written));
  env.settle();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 1, s.retries);
  KJ_EXPECT(s.droppedStale == 1, s.droppedStale, s.droppedFailed);
  KJ_EXPECT(s.connectionsOpened == 2, s.connectionsOpened);
}

BOTH_TRANSPORTS(retryFailingIsNotRetriedAgain,
    "a retried request whose new connection is found closed before anything was written fails, "
    "and is not sent a third time") {
  env.serveFirst();
  env.deadFrom = 1;    // every new connection is closed by the server before the request
  env.refuseFrom = 4;  // bounds a pool that would retry forever
  auto request = env.pool->request(kj::HttpMethod::GET, "/second", env.headers());
  request.body = nullptr;
  KJ_EXPECT(env.peer(0).readRequest().startsWith("GET /second "));
  env.peer(0).close();
  auto e = env.failureOf(kj::mv(request.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  env.settle();
  KJ_EXPECT(env.connects == 2, "the request was sent more than twice", env.connects);
  KJ_EXPECT(env.pool->getStats().retries == 1, env.pool->getStats().retries);
}

BOTH_TRANSPORTS(stalePostNotRetried,
    "a POST whose bytes reached the server is never sent again, even on a stale connection") {
  env.serveFirst();
  auto request = env.pool->request(kj::HttpMethod::POST, "/post", env.headers(), uint64_t(4));
  auto write = writeAll(*request.body, "data"_kj.asBytes());
  auto text = env.peer(0).readRequest();
  KJ_EXPECT(text.startsWith("POST /post "), text);
  KJ_EXPECT(test::contains(text, "data"), text);
  env.expectFailsNotResent(kj::mv(write), request);
}

SOCKFETCH_TRANSPORT_PAIR(PoolEnv, staleStreamedPutNotRetried,
    "an idempotent request whose body the pool does not hold (streamed) is not sent again after "
    "part of it reached a stale connection",
    "pipe", (false, smallReplay()), "tcp", (true, smallReplay())) {
  env.serveFirst();
  // 16 bytes: more than maxReplayBodyBytes, so the body is streamed, not buffered.
  auto request = env.pool->request(kj::HttpMethod::PUT, "/put", env.headers(), uint64_t(16));
  auto write = writeAll(*request.body, "0123456789abcdef"_kj.asBytes());
  auto text = env.peer(0).readRequest();
  KJ_EXPECT(text.startsWith("PUT /put "), text);
  env.expectFailsNotResent(kj::mv(write), request);
}

BOTH_TRANSPORTS(idleDropsCountedByReason,
    "an idle connection dropped for unsolicited bytes and one the server closed are counted each "
    "under its own reason") {
  env.serveFirst();
  // Nobody asked for this (on a pipe the write never completes: the idle read takes one byte).
  auto unsolicited = env.peer(0).sendLater("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
  env.waitFor([&]() { return env.pool->getIdleCount() == 0; });
  unsolicited = nullptr;
  KJ_EXPECT(env.pool->getIdleCount() == 0, "a poisoned idle connection stayed in the pool");

  // A second connection, served once, then closed by the server while idle.
  {
    auto request = env.pool->request(kj::HttpMethod::GET, "/again", env.headers());
    request.body = nullptr;
    KJ_EXPECT(env.peer(1).readRequest().startsWith("GET /again "));
    auto written = env.peer(1).sendLater(OK_HELLO);
    auto response = env.bounded(kj::mv(request.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "hello");
    env.bounded(kj::mv(written));
  }
  env.peer(1).close();
  env.waitFor([&]() { return env.pool->getIdleCount() == 0; });
  env.settle();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.droppedUnsolicitedBytes == 1, s.droppedUnsolicitedBytes, s.droppedPeerClosedIdle);
  KJ_EXPECT(s.droppedPeerClosedIdle == 1, s.droppedPeerClosedIdle, s.droppedUnsolicitedBytes);
  KJ_EXPECT(s.dropped() == 2, s.dropped());
  KJ_EXPECT(s.connectionsOpened == 2 && env.pool->getOpenCount() == 0, s.connectionsOpened,
      env.pool->getOpenCount());
}

BOTH_TRANSPORTS(upgradeCountedAndLeavesPool,
    "a 101 to a plain request takes its connection out of the pool, counted as upgraded, and the "
    "next request gets a new connection") {
  env.serveFirst();
  auto request = env.pool->request(kj::HttpMethod::GET, "/up", env.headers());
  request.body = nullptr;
  KJ_EXPECT(env.peer(0).readRequest().startsWith("GET /up "));
  auto written = env.peer(0).sendLater(
      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nraw");
  auto response = env.bounded(kj::mv(request.response));
  KJ_EXPECT(response.statusCode == 101, response.statusCode);
  char buffer[3];
  KJ_EXPECT(env.bounded(response.body->tryRead(buffer, 3, 3)) == 3);
  KJ_EXPECT(kj::heapString(buffer, 3) == "raw");
  env.bounded(kj::mv(written));
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.droppedUpgraded == 1 && s.dropped() == 1, s.droppedUpgraded, s.dropped());
  KJ_EXPECT(env.pool->getOpenCount() == 0 && env.pool->getIdleCount() == 0);

  auto next = env.pool->request(kj::HttpMethod::GET, "/next", env.headers());
  next.body = nullptr;
  KJ_EXPECT(env.peer(1).readRequest().startsWith("GET /next "));
  KJ_EXPECT(env.connects == 2, env.connects);
}

// =================================================================================================
// The guard (one StreamFetcher)

#define FETCHER_BOTH_TRANSPORTS(name, description) \
  SOCKFETCH_TRANSPORT_PAIR(test::FetcherEnv, name, description, "pipe", (false), "tcp", (true))

FETCHER_BOTH_TRANSPORTS(releaseKeepsIdleWatchByte,
    "release() after the idle watch has started hands back every byte the server sent, the one "
    "that watch read first") {
  env.roundTrip("/first");
  env.settle();  // the loop went idle: the idle read is outstanding (on a socket too)
  auto sent = env.peer->sendLater("XY");
  auto stream = env.fetcher->release();  // no turn of the loop in between
  char buffer[4];
  size_t n = env.read(*stream, buffer, 2, sizeof(buffer));
  KJ_EXPECT(kj::heapString(buffer, n) == "XY", kj::heapString(buffer, n));
  env.bounded(kj::mv(sent));
}

}  // namespace
}  // namespace sockfetch
