// What outlives what: the idle reads that one deferral per thread starts for every socket gone
// idle (FramedStream), across fetchers, pools and event loops of one thread; and pooled
// connections while busy, kept by themselves and not by their response bodies (ConnectionPool),
// with the pool destroyed, bodies held or dropped, upgrades, retirements and retries. Real
// loopback TCP, unix sockets and socketpairs (kj's own socket streams, so plain sockets too) and
// in-process pipes; every wait is bounded.

#include "framed-stream.h"
#include "pool.h"
#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/timer.h>
#include <string.h>

namespace sockfetch {
namespace {

using test::contains;
using test::ok;
using test::pathOf;
using test::ScriptedServer;
using Reply = ScriptedServer::Reply;
using Response = kj::HttpClient::Response;

kj::Maybe<kj::String> headerOf(kj::StringPtr request, kj::StringPtr name) {
  // Case-sensitive lookup, good enough for kj-http's own spelling.
  auto needle = kj::str("\r\n", name, ": ");
  const char* found = strstr(request.cStr(), needle.cStr());
  if (found == nullptr) return nullptr;
  size_t start = found - request.cStr() + needle.size();
  size_t end = start;
  while (end < request.size() && request[end] != '\r') end++;
  return kj::heapString(request.slice(start).begin(), end - start);
}

class RecordLoss final: public FramedStream::IdleListener {
public:
  void idleConnectionLost(bool gotBytes, kj::String reason) override {
    ++losses;
    lost = true;
    this->gotBytes = gotBytes;
    this->reason = kj::mv(reason);
    KJ_IF_SOME(f, onLoss) {
      f();
    }
  }
  unsigned losses = 0;
  bool lost = false;
  bool gotBytes = false;
  kj::String reason;
  kj::Maybe<kj::Function<void()>> onLoss;
};

struct IdleSocket {
  // A FramedStream over one end of a unix socketpair (kj's own socket stream: a plain socket);
  // the test plays the server on `peer`.
  kj::Own<FramedStream> stream;
  kj::Own<kj::AsyncIoStream> peer;
  RecordLoss listener;
};

IdleSocket newIdleSocket(kj::AsyncIoContext& io) {
  auto pair = io.provider->newTwoWayPipe();
  return IdleSocket{kj::heap<FramedStream>(kj::mv(pair.ends[0]), ResponseFramer::Limits(),
      io.provider->getTimer()), kj::mv(pair.ends[1]), RecordLoss()};
}

// =================================================================================================
// Pool environment: a scripted loopback upstream (TCP or unix socket) and a pool whose connector
// the test observes (client sockets alive, most at once).

struct PoolEnv {
  // Not a LoopEnv: several may share one event loop (two pools in one thread).
  kj::AsyncIoContext& io;
  kj::WaitScope& ws;
  kj::Timer& timer;
  kj::HttpHeaderTable& table;
  kj::Own<ScriptedServer> server;
  kj::Own<kj::NetworkAddress> address;
  unsigned liveStreams = 0;
  unsigned maxLiveStreams = 0;
  unsigned maxConnections;
  kj::Own<ConnectionPool> pool;

  using Script = kj::Function<Reply(unsigned connection, unsigned request, kj::StringPtr text)>;
  Script script;

  PoolEnv(kj::AsyncIoContext& io, kj::HttpHeaderTable& table, Script script,
      ConnectionPool::Settings settings = {}, kj::StringPtr listenOn = "127.0.0.1")
      : io(io), ws(io.waitScope), timer(io.provider->getTimer()), table(table),
        maxConnections(settings.maxConnections), script(kj::mv(script)) {
    server = kj::heap<ScriptedServer>(io, listenOn,
        [this](unsigned connection, unsigned request, kj::StringPtr text) {
      return this->script(connection, request, text);
    });
    address = server->address();
    pool = kj::heap<ConnectionPool>(timer, table, [this]() { return connect(); },
        kj::mv(settings));
  }

  kj::Promise<kj::Own<kj::AsyncIoStream>> connect() {
    return address->connect().then([this](kj::Own<kj::AsyncIoStream>&& s) {
      ++liveStreams;
      maxLiveStreams = kj::max(maxLiveStreams, liveStreams);
      return s.attach(kj::defer([this]() { --liveStreams; }));
    });
  }

  kj::HttpHeaders headers() {
    kj::HttpHeaders h(table);
    h.set(kj::HttpHeaderId::HOST, "upstream.test");
    return h;
  }

  kj::Promise<Response> start(kj::StringPtr url, kj::HttpMethod method = kj::HttpMethod::GET) {
    auto request = pool->request(method, url, headers());
    request.body = nullptr;
    return request.response.eagerlyEvaluate(nullptr);
  }

  kj::Promise<kj::String> get(kj::StringPtr url) {
    return start(url).then([](Response&& response) {
      return response.body->readAllText().attach(kj::mv(response.body));
    }).eagerlyEvaluate(nullptr);
  }

  template <typename T>
  T bounded(kj::Promise<T> promise) {
    return promise.exclusiveJoin(timer.afterDelay(2 * kj::SECONDS).then([]() -> T {
      KJ_FAIL_ASSERT("timed out: the library hung");
    })).wait(ws);
  }

  void settle(kj::Duration d = 20 * kj::MILLISECONDS) {
    timer.afterDelay(d).wait(ws);
  }

  template <typename Func>
  void waitFor(Func&& condition) {
    auto deadline = timer.now() + 2 * kj::SECONDS;
    while (!condition() && timer.now() < deadline) {
      timer.afterDelay(1 * kj::MILLISECONDS).wait(ws);
    }
  }

  void check() {
    KJ_EXPECT(pool->getOpenCount() <= maxConnections, pool->getOpenCount(), maxConnections);
    KJ_EXPECT(liveStreams <= maxConnections, liveStreams, maxConnections);
  }

  void checkQuiescent() {
    // Every connection opened is open (idle) or counted once under a drop reason, and the sockets
    // the pool holds are exactly those it counts.
    settle();
    test::expectEveryConnectionCounted(ws, *pool, liveStreams);
    waitFor([&]() { return server->open == liveStreams; });
    KJ_EXPECT(server->open == liveStreams, server->open, liveStreams);
  }
};

ConnectionPool::Settings limits(unsigned maxConnections) {
  ConnectionPool::Settings settings;
  settings.maxConnections = maxConnections;
  return settings;
}

PoolEnv::Script echo(kj::Duration delay = 0 * kj::MILLISECONDS) {
  return [delay](unsigned, unsigned, kj::StringPtr text) {
    auto reply = ok(pathOf(text));
    reply.delay = delay;
    return reply;
  };
}

void warm(PoolEnv& env, unsigned count, kj::StringPtr prefix) {
  // Opens `count` connections at once (the server answers a little later, so none is reused)
  // and reads every response: the pool then holds `count` idle connections.
  kj::Vector<kj::Promise<kj::String>> all;
  for (unsigned i = 0; i < count; i++) all.add(env.get(kj::str(prefix, i)));
  for (unsigned i = 0; i < count; i++) {
    KJ_EXPECT(env.bounded(kj::mv(all[i])) == kj::str(prefix, i));
  }
}

// =================================================================================================
// Idle reads started by one deferral per thread (FramedStream::ProbeStarter)

KJ_TEST("idle sockets of several pools and fetchers in one thread, over sequential "
    "event loops, are all noticed lost while idle without any request") {
  // Two pools and a lone StreamFetcher share the thread's ProbeStarter; the loop is then
  // destroyed (so is the starter) and everything is done again in a new loop of the same thread.
  for (int round = 0; round < 3; round++) {
    KJ_CONTEXT(round);
    kj::AsyncIoContext io = kj::setupAsyncIo();
    kj::HttpHeaderTable table;
    // Pool A's upstream poisons each connection after its answer; pool B's (a unix socket on
    // round 1) is closed by the server once idle.
    PoolEnv a(io, table, [](unsigned, unsigned, kj::StringPtr text) {
      auto reply = ok(pathOf(text));
      reply.delay = 5 * kj::MILLISECONDS;
      reply.thenUnsolicited = kj::str("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON");
      return reply;
    }, limits(4));
    PoolEnv b(io, table, echo(5 * kj::MILLISECONDS), limits(4),
        round == 1 ? "unix"_kj : "127.0.0.1"_kj);

    // A lone fetcher over a unix socketpair (kj's own socket stream: a plain socket).
    auto pair = io.provider->newTwoWayPipe();
    StreamFetcher lone(kj::mv(pair.ends[0]), table);
    auto loneServer = kj::mv(pair.ends[1]);

    warm(a, 3, "/a");
    warm(b, 3, "/b");
    KJ_EXPECT(b.pool->getIdleCount() == 3);
    b.server->closeIdleConnections();
    loneServer = nullptr;

    a.waitFor([&]() {
      return a.pool->getStats().droppedUnsolicitedBytes == 3 &&
          b.pool->getStats().droppedPeerClosedIdle == 3 &&
          lone.getState() == StreamFetcher::State::CLOSED;
    });
    KJ_EXPECT(a.pool->getStats().droppedUnsolicitedBytes == 3,
        a.pool->getStats().droppedUnsolicitedBytes);
    KJ_EXPECT(b.pool->getStats().droppedPeerClosedIdle == 3,
        b.pool->getStats().droppedPeerClosedIdle);
    KJ_EXPECT(lone.getState() == StreamFetcher::State::CLOSED, lone.getState());
    KJ_EXPECT(lone.getCloseKind() == StreamFetcher::CloseKind::PEER_CLOSED_IDLE);
    KJ_EXPECT(a.pool->getStats().requests == 3 && b.pool->getStats().requests == 3);
    KJ_EXPECT(a.pool->getIdleCount() == 0 && b.pool->getIdleCount() == 0);
    a.checkQuiescent();
    b.checkQuiescent();
    KJ_EXPECT(a.liveStreams == 0 && b.liveStreams == 0, a.liveStreams, b.liveStreams);

    // Reuse after it all: fresh connections, right answers (never the poison).
    KJ_EXPECT(a.bounded(a.get("/after")) == "/after");
    KJ_EXPECT(b.bounded(b.get("/after")) == "/after");
    if (round == 2) {
      // Leave an idle connection with its idle read due (no idle loop in between) when the loop
      // goes: the starter dies with it, with its deferral still armed.
      auto last = b.start("/last");
      auto response = b.bounded(kj::mv(last));
      KJ_EXPECT(b.bounded(response.body->readAllText()) == "/last");
      response.body = nullptr;  // the connection goes idle: listed, the deferral armed
      b.pool = nullptr;
      a.pool = nullptr;
    }
  }
}

KJ_TEST("the starter destroyed with its deferral armed, then new sockets in the same "
    "turn and in a new event loop, are all watched") {
  for (int loop = 0; loop < 2; loop++) {
    KJ_CONTEXT(loop);
    kj::AsyncIoContext io = kj::setupAsyncIo();
    auto& timer = io.provider->getTimer();
    constexpr size_t COUNT = 4;
    auto make = [&]() { return newIdleSocket(io); };
    // First batch: listed (deferral armed), then all destroyed in the same turn: the starter goes.
    {
      kj::Vector<IdleSocket> first;
      for (size_t i = 0; i < COUNT; i++) first.add(make());
      for (auto& c: first) c.stream->watchIdle(c.listener);
    }
    // Second batch, same turn: a new starter.
    kj::Vector<IdleSocket> second;
    for (size_t i = 0; i < COUNT; i++) second.add(make());
    for (auto& c: second) c.stream->watchIdle(c.listener);
    for (size_t i = 0; i < COUNT; i++) {
      if (i % 2 == 0) {
        second[i].peer = nullptr;
      }
    }
    kj::Vector<kj::Promise<void>> writes;
    for (size_t i = 0; i < COUNT; i++) {
      if (i % 2 == 1) writes.add(second[i].peer->write("Z", 1));
    }
    auto deadline = timer.now() + 2 * kj::SECONDS;
    auto allLost = [&]() {
      for (auto& c: second) if (!c.listener.lost) return false;
      return true;
    };
    while (!allLost() && timer.now() < deadline) {
      timer.afterDelay(1 * kj::MILLISECONDS).wait(io.waitScope);
    }
    for (size_t i = 0; i < COUNT; i++) {
      KJ_EXPECT(second[i].listener.lost, i);
      KJ_EXPECT(second[i].listener.losses == (second[i].listener.lost ? 1 : 0), i);
      KJ_EXPECT(second[i].listener.gotBytes == (i % 2 == 1), i, second[i].listener.reason);
    }
    for (auto& w: writes) w.wait(io.waitScope);
    // The loop ends with sockets listed again (a new deferral armed): a third batch, idle, then
    // the loop and all its streams go together on the next iteration.
    second.clear();
    kj::Vector<IdleSocket> third;
    for (size_t i = 0; i < COUNT; i++) third.add(make());
    for (auto& c: third) c.stream->watchIdle(c.listener);
  }
}

KJ_TEST("sockets going idle inside other evalLast() callbacks, before and after the "
    "shared deferral runs, are watched") {
  // kj runs evalLast() callbacks LIFO: one armed after the starter's deferral runs before it, one
  // armed before it runs after it.
  kj::AsyncIoContext io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  auto make = [&]() { return newIdleSocket(io); };
  IdleSocket early = make(), first = make(), inside = make(), after = make(), nested = make();
  bool ranEarly = false, ranInside = false, ranNested = false;
  // Armed before the deferral exists: runs after it.
  auto before = kj::evalLast([&]() {
    ranEarly = true;
    early.stream->watchIdle(early.listener);
    // And one level deeper: an evalLast armed from there.
    return kj::evalLast([&]() {
      ranNested = true;
      nested.stream->watchIdle(nested.listener);
    });
  }).eagerlyEvaluate(nullptr);
  first.stream->watchIdle(first.listener);  // arms the shared deferral
  // Armed after the deferral: runs before it, so the stream joins the batch about to start.
  auto afterDeferral = kj::evalLast([&]() {
    ranInside = true;
    inside.stream->watchIdle(inside.listener);
  }).eagerlyEvaluate(nullptr);
  auto deadline = timer.now() + 2 * kj::SECONDS;
  while (!(ranEarly && ranInside && ranNested) && timer.now() < deadline) {
    timer.afterDelay(1 * kj::MILLISECONDS).wait(io.waitScope);
  }
  KJ_ASSERT(ranEarly && ranInside && ranNested);
  after.stream->watchIdle(after.listener);  // long after, a fresh deferral
  // Now the peers close: every one of them must be noticed by its idle read alone (nobody asks).
  for (auto* c: {&early, &first, &inside, &after, &nested}) c->peer = nullptr;
  auto allLost = [&]() {
    for (auto* c: {&early, &first, &inside, &after, &nested}) {
      if (!c->listener.lost) return false;
    }
    return true;
  };
  while (!allLost() && timer.now() < deadline) {
    timer.afterDelay(1 * kj::MILLISECONDS).wait(io.waitScope);
  }
  KJ_EXPECT(early.listener.lost);
  KJ_EXPECT(first.listener.lost);
  KJ_EXPECT(inside.listener.lost);
  KJ_EXPECT(after.listener.lost);
  KJ_EXPECT(nested.listener.lost);
  before.wait(io.waitScope);
  afterDeferral.wait(io.waitScope);
}

KJ_TEST("an idle-loss callback that destroys, idles, releases and reuses other listed "
    "sockets leaves every list link sound") {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  auto make = [&]() { return kj::heap<IdleSocket>(newIdleSocket(io)); };
  auto trigger = make();
  kj::Vector<kj::Own<IdleSocket>> others;
  for (int i = 0; i < 6; i++) others.add(make());
  trigger->stream->watchIdle(trigger->listener);
  timer.afterDelay(2 * kj::MILLISECONDS).wait(io.waitScope);  // trigger's idle read is started
  kj::Own<kj::AsyncIoStream> released;
  bool othersListedFirst = false;
  trigger->listener.onLoss = [&]() {
    // From within the idle read's continuation: stream 0 destroyed (the list's tail), 3 destroyed
    // (middle), 1 released, 2 begins an exchange, and a new one goes idle.
    othersListedFirst = others[5]->stream->checkIdleNow() == nullptr;
    others[0]->stream = nullptr;
    others[3]->stream = nullptr;
    others[1]->stream->passThrough();
    released = kj::mv(others[1]->stream);
    KJ_EXPECT(others[2]->stream->checkIdleNow() == nullptr);
    others[2]->stream->beginExchange(kj::HttpMethod::GET);
    others.add(make());
    others.back()->stream->watchIdle(others.back()->listener);
  };
  // The trigger's peer closes; in the same poll of the event loop a timer makes the others idle,
  // so that they are listed (their deferral armed, after everything else) when the trigger's
  // idle read reports.
  trigger->peer = nullptr;
  timer.afterDelay(0 * kj::MILLISECONDS).then([&]() {
    for (auto& c: others) c->stream->watchIdle(c->listener);
  }).wait(io.waitScope);
  auto deadline = timer.now() + 2 * kj::SECONDS;
  while (!trigger->listener.lost && timer.now() < deadline) {
    timer.afterDelay(1 * kj::MILLISECONDS).wait(io.waitScope);
  }
  KJ_ASSERT(trigger->listener.lost);
  KJ_LOG(INFO, othersListedFirst);
  // Every stream still idle and listed must be watched: close their peers.
  for (auto& c: others) c->peer = nullptr;
  auto watched = [&](size_t i) { return i == 4 || i == 5 || i == 6; };
  auto done = [&]() {
    for (size_t i = 0; i < others.size(); i++) {
      if (watched(i) && !others[i]->listener.lost) return false;
    }
    return true;
  };
  while (!done() && timer.now() < deadline) {
    timer.afterDelay(1 * kj::MILLISECONDS).wait(io.waitScope);
  }
  for (size_t i = 0; i < others.size(); i++) {
    KJ_EXPECT(others[i]->listener.lost == watched(i), i);
  }
  // The released stream reads the peer's EOF as a plain stream.
  char c;
  KJ_EXPECT(released->tryRead(&c, 1, 1).wait(io.waitScope) == 0);
}

KJ_TEST("a pool notices many idle connections lost at once (some closed, some "
    "poisoned, some reset) without any new request, each counted once") {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  constexpr unsigned N = 12;
  PoolEnv env(io, table, [](unsigned connection, unsigned, kj::StringPtr text) {
    auto reply = ok(pathOf(text));
    reply.delay = 10 * kj::MILLISECONDS;
    if (connection % 2 == 1) {
      reply.thenUnsolicited = kj::str("X");
    }
    return reply;
  }, limits(N));
  warm(env, N, "/w");
  // The odd connections were poisoned 5 ms after their answers; close the even ones now.
  env.server->closeIdleConnections();
  env.waitFor([&]() { return env.pool->getIdleCount() == 0; });
  auto& s = env.pool->getStats();
  KJ_EXPECT(env.pool->getIdleCount() == 0, env.pool->getIdleCount());
  KJ_EXPECT(s.droppedPeerClosedIdle + s.droppedUnsolicitedBytes == N, s.droppedPeerClosedIdle,
      s.droppedUnsolicitedBytes);
  KJ_EXPECT(s.droppedUnsolicitedBytes >= N / 2 - 1, s.droppedUnsolicitedBytes);
  KJ_EXPECT(s.requests == N);
  env.checkQuiescent();
  KJ_EXPECT(env.liveStreams == 0);
}

// =================================================================================================
// A busy pooled connection keeps itself; its response body does not keep it

KJ_TEST("pool destroyed with bodies in hand, unread: they read to their end, every "
    "socket closes once they are dropped") {
  for (int variant = 0; variant < 4; variant++) {
    KJ_CONTEXT(variant);
    kj::AsyncIoContext io = kj::setupAsyncIo();
    kj::HttpHeaderTable table;
    PoolEnv env(io, table, [](unsigned, unsigned, kj::StringPtr text) {
      auto path = pathOf(text);
      if (path.startsWith("/chunked")) {
        Reply reply;
        reply.bytes = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            kj::hex(path.size()), "\r\n", path, "\r\n0\r\n\r\n");
        return reply;
      }
      return ok(path);
    }, limits(4));
    kj::Vector<Response> responses;
    for (auto path: {"/a", "/chunked-b", "/c"}) {
      responses.add(env.bounded(env.start(path)));
    }
    KJ_EXPECT(env.pool->getOpenCount() == 3);
    env.pool = nullptr;
    env.settle(5 * kj::MILLISECONDS);
    KJ_EXPECT(env.liveStreams == 3, "a socket closed while its body was unread", env.liveStreams);
    switch (variant) {
      case 0:
        // Read to the end and kept: with no pool to take them back, the server sees each
        // connection closed at once; the stream objects go with the bodies.
        KJ_EXPECT(env.bounded(responses[0].body->readAllText()) == "/a");
        KJ_EXPECT(env.bounded(responses[1].body->readAllText()) == "/chunked-b");
        KJ_EXPECT(env.bounded(responses[2].body->readAllText()) == "/c");
        env.waitFor([&]() { return env.server->open == 0; });
        KJ_EXPECT(env.server->open == 0, "a finished body kept its connection open",
            env.server->open);
        KJ_EXPECT(env.liveStreams == 3, env.liveStreams);
        responses.clear();
        break;
      case 1:
        // Dropped unread.
        responses.clear();
        break;
      case 2:
        // One read, one dropped, one held to the end of the loop (dropped with the env).
        KJ_EXPECT(env.bounded(responses[0].body->readAllText()) == "/a");
        responses[1].body = nullptr;
        break;
      case 3: {
        // A read in progress when its body is dropped.
        char buffer[1];
        auto read = responses[0].body->tryRead(buffer, 1, 1);
        responses.clear();
        break;
      }
    }
    if (variant == 2) {
      // The dropped body's socket goes; the body read to its end (still held) keeps its stream
      // object but not its connection, which the server sees closed; the unread one stays open.
      env.waitFor([&]() { return env.liveStreams == 2 && env.server->open == 1; });
      env.settle(5 * kj::MILLISECONDS);
      KJ_EXPECT(env.liveStreams == 2, env.liveStreams);
      KJ_EXPECT(env.server->open == 1, env.server->open);
      responses.clear();
    }
    env.waitFor([&]() { return env.liveStreams == 0 && env.server->open == 0; });
    KJ_EXPECT(env.liveStreams == 0, env.liveStreams);
    KJ_EXPECT(env.server->open == 0, env.server->open);
  }
}

KJ_TEST("response promises dropped while in flight free their connections for "
    "waiters, counted once as abandoned") {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  PoolEnv env(io, table, [](unsigned, unsigned, kj::StringPtr text) {
    auto path = pathOf(text);
    auto reply = ok(path);
    if (path.startsWith("/slow")) reply.delay = 50 * kj::MILLISECONDS;
    return reply;
  }, limits(2));
  kj::Vector<kj::Promise<Response>> slow;
  slow.add(env.start("/slow0"));
  slow.add(env.start("/slow1"));
  auto waiting = env.get("/next");
  env.waitFor([&]() { return env.server->busy == 2; });
  KJ_ASSERT(env.pool->getWaitingCount() == 1);
  env.check();
  slow.clear();  // both given up while the server prepares its answers
  KJ_EXPECT(env.bounded(kj::mv(waiting)) == "/next");
  env.check();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.droppedAbandoned == 2, s.droppedAbandoned);
  env.checkQuiescent();
  KJ_EXPECT(env.pool->getOpenCount() == 1);
}

KJ_TEST("a WebSocket through the pool outlives the pool; the upgraded connection leaves "
    "the count at once and closes when the WebSocket goes") {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  PoolEnv env(io, table, [](unsigned, unsigned, kj::StringPtr text) {
    auto path = pathOf(text);
    if (path == "/ws") {
      auto key = KJ_ASSERT_NONNULL(headerOf(text, "Sec-WebSocket-Key"));
      Reply reply;
      reply.bytes = kj::str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
          "Connection: Upgrade\r\nSec-WebSocket-Accept: ", test::webSocketAccept(key),
          "\r\n\r\n\x81\x02hi");
      return reply;
    }
    return ok(path);
  }, limits(1));
  KJ_EXPECT(env.bounded(env.get("/warm")) == "/warm");
  auto response = env.bounded(env.pool->openWebSocket("/ws", env.headers()));
  KJ_ASSERT(response.statusCode == 101, response.statusCode);
  auto ws = kj::mv(KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::WebSocket>>()));
  KJ_EXPECT(env.pool->getStats().droppedUpgraded == 1);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  // The only connection slot is free: a plain request goes through while the WebSocket lives.
  KJ_EXPECT(env.bounded(env.get("/beside")) == "/beside");
  env.pool = nullptr;
  auto message = env.bounded(ws->receive());
  KJ_ASSERT(message.is<kj::String>());
  KJ_EXPECT(message.get<kj::String>() == "hi");
  env.bounded(ws->send("yo"_kj));
  KJ_EXPECT(env.liveStreams == 1, env.liveStreams);  // only the WebSocket's
  ws = nullptr;
  env.waitFor([&]() { return env.liveStreams == 0 && env.server->open == 0; });
  KJ_EXPECT(env.liveStreams == 0 && env.server->open == 0, env.liveStreams, env.server->open);
}

KJ_TEST("a 101 to a plain request through the pool: the body outlives the pool, the "
    "connection leaves the count and closes with the body") {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  PoolEnv env(io, table, [](unsigned, unsigned, kj::StringPtr text) {
    Reply reply;
    reply.bytes = kj::str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: "
        "Upgrade\r\n\r\nraw-bytes");
    return reply;
  }, limits(1));
  auto response = env.bounded(env.start("/up"));
  KJ_EXPECT(response.statusCode == 101);
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  KJ_EXPECT(env.pool->getStats().droppedUpgraded == 1);
  env.pool = nullptr;
  env.settle(5 * kj::MILLISECONDS);
  KJ_EXPECT(env.liveStreams == 1);
  response.body = nullptr;
  env.waitFor([&]() { return env.liveStreams == 0 && env.server->open == 0; });
  KJ_EXPECT(env.liveStreams == 0 && env.server->open == 0, env.liveStreams, env.server->open);
}

void retirement(ConnectionPool::Settings settings, kj::HttpMethod method, kj::StringPtr status,
    uint64_t ConnectionPool::Stats::*counter, unsigned expectedDrops, bool destroyAfter) {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  settings.maxConnections = 2;
  PoolEnv env(io, table, [status](unsigned, unsigned, kj::StringPtr text) {
    Reply reply;
    if (status == "204") {
      reply.bytes = kj::str("HTTP/1.1 204 No Content\r\n\r\n");
    } else {
      auto path = pathOf(text);
      reply.bytes = kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", path.size(), "\r\n\r\n",
          text.startsWith("HEAD") ? kj::str() : kj::str(path));
    }
    reply.delay = 2 * kj::MILLISECONDS;
    return reply;
  }, kj::mv(settings));
  kj::Vector<kj::Promise<kj::String>> all;
  for (int i = 0; i < 4; i++) {
    all.add(env.start(kj::str("/r", i), method).then([](Response&& r) {
      return r.body->readAllText().attach(kj::mv(r.body));
    }).eagerlyEvaluate(nullptr));
    env.check();
  }
  for (int i = 0; i < 4; i++) {
    auto text = env.bounded(kj::mv(all[i]));
    if (method == kj::HttpMethod::GET && status != "204") {
      KJ_EXPECT(text == kj::str("/r", i));
    }
    env.check();
  }
  if (destroyAfter) {
    env.pool = nullptr;
    env.waitFor([&]() { return env.liveStreams == 0 && env.server->open == 0; });
    KJ_EXPECT(env.liveStreams == 0 && env.server->open == 0, env.liveStreams, env.server->open);
    return;
  }
  KJ_EXPECT(env.pool->getStats().*counter == expectedDrops, env.pool->getStats().*counter);
  env.checkQuiescent();
}

KJ_TEST("connections retired by neverReuse, maxRequestsPerConnection and "
    "maxIdleConnections, for bodies, HEAD and 204, close and count once") {
  for (bool destroyAfter: {false, true}) {
    for (auto method: {kj::HttpMethod::GET, kj::HttpMethod::HEAD}) {
      for (kj::StringPtr status: {"200"_kj, "204"_kj}) {
        KJ_CONTEXT(destroyAfter, method, status);
        {
          ConnectionPool::Settings s;
          s.neverReuse = true;
          retirement(kj::mv(s), method, status, &ConnectionPool::Stats::droppedNeverReuse, 4,
              destroyAfter);
        }
        {
          ConnectionPool::Settings s;
          s.maxRequestsPerConnection = 1;
          retirement(kj::mv(s), method, status, &ConnectionPool::Stats::droppedMaxRequests, 4,
              destroyAfter);
        }
        {
          ConnectionPool::Settings s;
          s.maxIdleConnections = 0;
          retirement(kj::mv(s), method, status, &ConnectionPool::Stats::droppedIdleLimit, 2,
              destroyAfter);
        }
      }
    }
  }
}

KJ_TEST("stale keep-alive retries and bodies read in any order keep the counts true") {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  PoolEnv env(io, table, [](unsigned connection, unsigned request, kj::StringPtr text) {
    if (request == 1 && connection % 2 == 0) {
      Reply reply;
      reply.closeAfter = true;  // stale: closes without a word on the second request
      return reply;
    }
    return ok(pathOf(text));
  }, limits(3));
  for (int round = 0; round < 4; round++) {
    kj::Vector<kj::Promise<Response>> responses;
    for (int i = 0; i < 3; i++) responses.add(env.start(kj::str("/r", round, "-", i)));
    kj::Vector<Response> got;
    for (auto& p: responses) got.add(env.bounded(kj::mv(p)));
    env.check();
    // Read in reverse order; drop one unread each round.
    for (int i = 2; i >= 0; i--) {
      if (i == round % 3) {
        got[i].body = nullptr;
      } else {
        KJ_EXPECT(env.bounded(got[i].body->readAllText()) == kj::str("/r", round, "-", i));
      }
      env.check();
    }
    got.clear();
    env.settle(2 * kj::MILLISECONDS);
  }
  KJ_EXPECT(env.pool->getStats().retries > 0);
  env.checkQuiescent();
}

KJ_TEST("random requests, early drops, cancellations and pool destruction: never more "
    "than maxConnections, and every socket closes") {
  for (unsigned seed = 1; seed <= 4; seed++) {
    KJ_CONTEXT(seed);
    kj::AsyncIoContext io = kj::setupAsyncIo();
    kj::HttpHeaderTable table;
    unsigned rng = seed * 2654435761u;
    auto next = [&rng]() {
      rng = rng * 1103515245u + 12345u;
      return (rng >> 16) & 0x7fff;
    };
    PoolEnv env(io, table, [](unsigned, unsigned request, kj::StringPtr text) {
      auto path = pathOf(text);
      auto reply = ok(path, request % 5 == 4 ? "Connection: close\r\n" : "");
      reply.delay = (path.size() % 3) * kj::MILLISECONDS;
      return reply;
    }, limits(3));
    kj::Vector<kj::Maybe<kj::Promise<Response>>> pending;
    kj::Vector<Response> held;
    for (int step = 0; step < 60; step++) {
      switch (next() % 6) {
        case 0: case 1: case 2:
          pending.add(env.start(kj::str("/s", step)));
          break;
        case 3:
          if (!pending.empty()) pending[next() % pending.size()] = nullptr;  // cancel
          break;
        case 4:
          for (auto& p: pending) {
            KJ_IF_SOME(promise, p) {
              if (promise.poll(env.ws)) {
                held.add(promise.wait(env.ws));
                p = nullptr;
                break;
              }
            }
          }
          break;
        case 5:
          if (!held.empty()) {
            size_t i = next() % held.size();
            if (next() % 2) {
              env.bounded(held[i].body->readAllText());
            }
            held[i].body = nullptr;
            held[i] = kj::mv(held.back());
            held.removeLast();
          }
          break;
      }
      env.check();
      kj::evalLater([]() {}).wait(env.ws);
      env.check();
    }
    if (seed % 2 == 0) env.pool = nullptr;  // with bodies held and requests in flight
    for (auto& p: pending) {
      KJ_IF_SOME(promise, p) {
        auto outcome = promise.then([](Response&& r) {
          return r.body->readAllText().attach(kj::mv(r.body)).ignoreResult();
        }, [](kj::Exception&&) {});
        env.bounded(kj::mv(outcome));
      }
    }
    pending.clear();
    held.clear();
    if (env.pool.get() != nullptr) {
      env.checkQuiescent();
      env.pool = nullptr;
    }
    env.waitFor([&]() { return env.liveStreams == 0 && env.server->open == 0; });
    KJ_EXPECT(env.liveStreams == 0 && env.server->open == 0, env.liveStreams, env.server->open);
  }
}

KJ_TEST("a body held unread keeps its connection counted; read to its end (still held) "
    "it frees the connection at once; dropping an old body never touches the next exchange") {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  ConnectionPool::Settings settings = limits(1);
  settings.waitTimeout = 100 * kj::MILLISECONDS;
  PoolEnv env(io, table, [](unsigned, unsigned, kj::StringPtr text) {
    auto path = pathOf(text);
    auto reply = ok(path);
    if (path == "/second") reply.delay = 20 * kj::MILLISECONDS;
    return reply;
  }, kj::mv(settings));
  auto first = env.bounded(env.start("/first"));
  KJ_EXPECT(env.pool->getOpenCount() == 1);
  // Unread: the only connection is busy, so a second request waits, and times out.
  {
    auto r = env.pool->request(kj::HttpMethod::GET, "/x", env.headers());
    auto outcome = r.response.then([](Response&&) { return kj::str("served"); },
        [](kj::Exception&& e) { return kj::str(e.getType()); });
    KJ_EXPECT(env.bounded(kj::mv(outcome)) == "overloaded");
  }
  // Read to its end but still held: the connection is back, the next request reuses it.
  KJ_EXPECT(env.bounded(first.body->readAllText()) == "/first");
  KJ_EXPECT(env.pool->getIdleCount() == 1);
  auto second = env.start("/second");
  env.waitFor([&]() { return env.server->busy == 1; });
  first.body = nullptr;  // the old exchange's body goes while the next exchange is in flight
  first.headers = nullptr;
  auto response = env.bounded(kj::mv(second));
  KJ_EXPECT(env.bounded(response.body->readAllText()) == "/second");
  response.body = nullptr;
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.reuses == 1, s.reuses);
  KJ_EXPECT(s.connectionsOpened == 1, s.connectionsOpened);
  KJ_EXPECT(s.dropped() == 0, s.dropped());
  env.checkQuiescent();
}

KJ_TEST("the pool destroyed from the continuation that read a body to its end") {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  PoolEnv env(io, table, echo(), limits(2));
  KJ_EXPECT(env.bounded(env.get("/a")) == "/a");
  auto response = env.bounded(env.start("/b"));
  auto text = env.bounded(response.body->readAllText().then([&](kj::String text) {
    env.pool = nullptr;  // the connection just came back idle
    return kj::mv(text);
  }));
  KJ_EXPECT(text == "/b");
  response.body = nullptr;
  env.waitFor([&]() { return env.liveStreams == 0 && env.server->open == 0; });
  KJ_EXPECT(env.liveStreams == 0 && env.server->open == 0, env.liveStreams, env.server->open);
}

}  // namespace
}  // namespace sockfetch
