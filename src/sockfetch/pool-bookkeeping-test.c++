// ConnectionPool's bookkeeping: which connection is idle, which request waits, and the counts.
// Hand-overs that race a cancellation or a wait timeout in the very event of the hand-over,
// connectors that re-enter the pool (called synchronously from within serveWaiters()), removals
// from anywhere in the idle chain followed by re-adds, the sweep's order, the pool destroyed with
// idle, busy, waiting and connecting all present, and a thousand idle connections and a thousand
// waiting requests kept in order.
//
// Everything runs over in-process pipes on a kj::TimerImpl the test advances by hand, so the
// order of events is deterministic; no case depends on wall-clock timing.

#include "pool.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/pipe-pool-env.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/vector.h>
#include <stdlib.h>
#include <string.h>

namespace sockfetch {
namespace {

using Response = kj::HttpClient::Response;
using Env = test::PipePoolEnv;
using test::connectionOf;
using test::limits;
using test::outcomeOf;

// =================================================================================================
// A connection handed to a waiter that is gone by the time the hand-over reaches it

KJ_TEST("pool bookkeeping: a waiter that gives up in the very event it is handed a returning "
    "connection leaves it clean in the pool, not closed") {
  // connectionIdle() fulfils the oldest waiter with the connection, which then belongs to no
  // chain: the waiter's promise alone holds it until the waiter's chain takes it, a few events
  // later. Here the caller drops that request in between (in the continuation of the read that
  // ended the previous response, the event of the hand-over). The connection, as clean as when
  // it was handed over, must go back to the pool, not be closed (and never go uncounted).
  Env env(limits(1));
  auto a = env.bounded(env.start("/a"));
  kj::Maybe<kj::Promise<Response>> b = env.start("/b");
  env.turns();
  KJ_ASSERT(env.pool->getWaitingCount() == 1);

  char buffer[64];
  auto n = env.bounded(a.body->tryRead(buffer, 1, sizeof(buffer)).then([&](size_t n) {
    // Same event as the hand-over: the fetcher's end-of-body continuation ran just before.
    b = nullptr;
    return n;
  }));
  KJ_EXPECT(kj::heapString(buffer, n) == "0 /a");
  a.body = nullptr;
  env.turns();

  auto& s = env.pool->getStats();
  // The hand-over really raced: /b never reached the wire.
  KJ_EXPECT(env.upstream.seen.size() == 1, env.upstream.seen.size());
  KJ_EXPECT(s.reuses == 0, s.reuses);
  KJ_EXPECT(env.pool->getWaitingCount() == 0);
  KJ_EXPECT(env.pool->getIdleCount() == 1 && s.dropped() == 0, env.pool->getIdleCount(),
      s.dropped());
  env.checkCounted("after the hand-over raced the cancellation");
  // The next request reuses it.
  KJ_EXPECT(env.get("/c") == "0 /c");
  KJ_EXPECT(s.connectionsOpened == 1 && s.reuses == 1, s.connectionsOpened, s.reuses);
  env.checkCounted("after /c");
}

KJ_TEST("pool bookkeeping: a waiter whose waitTimeout falls due in the event its new connection "
    "is handed over fails OVERLOADED, and the connection stays in the pool") {
  // serveWaiters() opens a connection for the oldest waiter (connectFor()). The connect completes
  // in the same event as the waiter's timeout is due: the connector's continuation advances the
  // timer (as a timer and an I/O completion can land in one turn of a real loop). connectFor()
  // sees the waiter still waiting and fulfils it, but the exclusiveJoin() in acquire() picks the
  // timeout, which was armed first, and drops the branch that holds the new connection. The
  // request has waited its waitTimeout, so it fails with OVERLOADED; the connection, never used,
  // goes to the pool for the next request.
  auto settings = limits(1);
  settings.waitTimeout = 50 * kj::MILLISECONDS;
  Env env(settings);
  auto a = env.bounded(env.start("/close-a"));  // its connection closes when its body ends
  auto b = env.start("/b").then([](Response&&) -> kj::String { return kj::str("served"); },
      [](kj::Exception&& e) { return kj::str(e.getType() == kj::Exception::Type::OVERLOADED
          ? "overloaded" : "failed: ", e.getDescription()); }).eagerlyEvaluate(nullptr);
  env.turns();
  KJ_ASSERT(env.pool->getWaitingCount() == 1);

  env.upstream.delayConnect = [&](kj::Promise<kj::Own<kj::AsyncIoStream>> stream) {
    return stream.then([&](kj::Own<kj::AsyncIoStream>&& s) {
      // Runs within the event that completes the connect, before connectFor()'s continuation.
      env.timer.advanceTo(env.timer.now() + 50 * kj::MILLISECONDS);
      return kj::mv(s);
    });
  };
  KJ_EXPECT(env.read(kj::mv(a)) == "0 /close-a");
  auto outcome = env.bounded(kj::mv(b));
  env.upstream.delayConnect = nullptr;
  env.turns();

  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened == 2, s.connectionsOpened);
  KJ_EXPECT(s.droppedConnectionClose == 1, s.droppedConnectionClose);
  KJ_EXPECT(outcome.startsWith("overloaded"), outcome);
  KJ_EXPECT(env.pool->getIdleCount() == 1 && s.dropped() == 1, env.pool->getIdleCount(),
      s.dropped());
  env.checkCounted(kj::str("after the race, outcome ", outcome));
  KJ_EXPECT(env.get("/c") == "1 /c");
  KJ_EXPECT(s.connectionsOpened == 2, s.connectionsOpened);
  env.checkCounted("after /c");
}

// =================================================================================================
// The idle chain: removal from the middle, re-adding, LIFO reuse and FIFO expiry

KJ_TEST("pool bookkeeping: removal from the middle, re-adding a reused connection as the "
    "newest, and the sweep expiring strictly oldest-idle first") {
  auto settings = limits(5);
  settings.idleTimeout = 100 * kj::MILLISECONDS;
  Env env(settings);
  auto& s = env.pool->getStats();

  // Five connections, going idle 1 ms apart: chain (oldest first) 0 1 2 3 4.
  kj::Vector<Response> held;
  for (int i = 0; i < 5; i++) held.add(env.bounded(env.start(kj::str("/w", i))));
  KJ_ASSERT(s.connectionsOpened == 5 && env.pool->getOpenCount() == 5);
  for (auto& r: held) {
    env.read(kj::mv(r));
    env.advance(1 * kj::MILLISECONDS);
  }
  KJ_EXPECT(env.pool->getIdleCount() == 5);

  // The server ends 2 (the middle) and 0 (the oldest) and 4 (the newest) in one event.
  env.upstream.end(2);
  env.upstream.end(0);
  env.upstream.end(4);
  env.turns();
  KJ_EXPECT(s.droppedPeerClosedIdle == 3, s.droppedPeerClosedIdle);
  KJ_EXPECT(env.pool->getIdleCount() == 2 && env.pool->getOpenCount() == 2,
      env.pool->getIdleCount(), env.pool->getOpenCount());
  env.checkCounted("after the server ended three");

  // Chain now 1 3. A request takes the newest (3), and gives it back 10 ms later: chain 1 3.
  KJ_EXPECT(connectionOf(env.get("/x")) == 3);
  env.advance(10 * kj::MILLISECONDS);
  // Taking two at once takes 3 then 1; giving back 1 first then 3 makes the chain 1 3 again, but
  // with 1 newer by its idleSince than 3 would be if order were by age: order is by return.
  auto r1 = env.bounded(env.start("/y"));
  auto r2 = env.bounded(env.start("/z"));
  KJ_EXPECT(env.pool->getIdleCount() == 0);
  auto t1 = env.read(kj::mv(r1));
  auto t2 = env.read(kj::mv(r2));
  KJ_EXPECT(connectionOf(t1) == 3 && connectionOf(t2) == 1, t1, t2);
  // Give-back order was 3 (t=15) then 1 (t=15): chain 3 1. Now 1 is newest.
  KJ_EXPECT(env.pool->getIdleCount() == 2);
  env.advance(5 * kj::MILLISECONDS);
  KJ_EXPECT(connectionOf(env.get("/n")) == 1, "the newest idle is reused first");
  // Chain: 3 (idle since t=15) 1 (idle since t=20).
  auto idleAt = env.timer.now();
  env.timer.advanceTo(idleAt + 96 * kj::MILLISECONDS);  // 3 is due at t=115, 1 at t=120
  env.turns();
  KJ_EXPECT(s.droppedIdleTimeout == 1, s.droppedIdleTimeout);
  KJ_EXPECT(env.pool->getIdleCount() == 1);
  KJ_EXPECT(connectionOf(env.get("/m")) == 1, "the oldest idle expired first");
  env.timer.advanceTo(env.timer.now() + 100 * kj::MILLISECONDS);
  env.turns();
  KJ_EXPECT(s.droppedIdleTimeout == 2, s.droppedIdleTimeout);
  KJ_EXPECT(env.pool->getIdleCount() == 0 && env.pool->getOpenCount() == 0);
  env.checkCounted("after every idle connection expired");
  KJ_EXPECT(env.get("/again").startsWith("5 "), "a new connection is opened");
  env.checkCounted("after /again");
}

KJ_TEST("pool bookkeeping: the idle limit, the sweep and server closes interleave; counts stay "
    "exact") {
  // Connections come back to a full idle chain (closed: droppedIdleLimit), the sweep expires
  // several in one event, and the server ends others, in a seeded random order; after every step
  // the pool's counts match the upstream's.
  auto settings = limits(6);
  settings.maxIdleConnections = 4;
  settings.idleTimeout = 30 * kj::MILLISECONDS;
  Env env(settings);
  auto& s = env.pool->getStats();
  uint64_t rng = 12345;
  auto next = [&]() {
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (rng * 0x2545F4914F6CDD1Dull) >> 33;
  };
  for (int round = 0; round < 60; round++) {
    KJ_CONTEXT(round);
    unsigned n = 1 + next() % 6;
    kj::Vector<kj::Promise<Response>> started;
    for (unsigned i = 0; i < n; i++) started.add(env.start(kj::str("/r", round, "-", i)));
    kj::Vector<Response> responses;
    for (auto& p: started) responses.add(env.bounded(kj::mv(p)));
    // Give them back in a random order.
    while (responses.size() > 0) {
      size_t k = next() % responses.size();
      env.read(kj::mv(responses[k]));
      responses[k] = kj::mv(responses.back());
      responses.removeLast();
    }
    switch (next() % 3) {
      case 0:
        env.advance((next() % 40) * kj::MILLISECONDS);
        break;
      case 1: {
        // The server ends a random connection (idle or long gone).
        env.upstream.end(next() % s.connectionsOpened);
        env.turns();
        break;
      }
      default:
        break;
    }
    KJ_EXPECT(env.pool->getIdleCount() <= 4, env.pool->getIdleCount());
    env.checkCounted("in the loop");
  }
  KJ_EXPECT(s.droppedIdleLimit > 0 && s.droppedIdleTimeout > 0 && s.droppedPeerClosedIdle > 0,
      s.droppedIdleLimit, s.droppedIdleTimeout, s.droppedPeerClosedIdle);
  env.pool = nullptr;
  env.turns();
  KJ_EXPECT(env.upstream.open == 0, env.upstream.open);
}

// =================================================================================================
// Re-entrancy: the connector is called synchronously from within the pool

KJ_TEST("pool bookkeeping: a connector that, called from serveWaiters(), cancels the next "
    "waiter and starts a new request: waiters are still served oldest first, counts stay exact") {
  Env env(limits(2));
  auto& s = env.pool->getStats();
  auto a = env.bounded(env.start("/close-a"));
  auto b = env.bounded(env.start("/close-b"));
  kj::Vector<kj::String> served;
  kj::Vector<kj::Maybe<kj::Promise<void>>> waiting;
  for (int i = 0; i < 5; i++) {
    waiting.add(env.start(kj::str("/q", i)).then([&served, i](Response&& r) {
      served.add(kj::str(i));
      return r.body->readAllText().ignoreResult().attach(kj::mv(r.body));
    }).eagerlyEvaluate(nullptr));
  }
  env.turns();
  KJ_ASSERT(env.pool->getWaitingCount() == 5);

  kj::Maybe<kj::Promise<kj::String>> late;
  unsigned calls = 0;
  env.upstream.inConnector = [&]() {
    // From within serveWaiters() (called by connectionClosed(), from within a fetcher): the
    // waiter behind the one being served gives up, and a new request is made.
    if (calls++ == 0) {
      waiting[1] = nullptr;
      late = env.start("/late").then([](Response&& r) {
        return r.body->readAllText().attach(kj::mv(r.body));
      }).eagerlyEvaluate(nullptr);
    }
  };
  // /close-a ends: its connection closes; q0 gets a new one (the hook runs then).
  KJ_EXPECT(env.read(kj::mv(a)) == "0 /close-a");
  env.turns();
  env.upstream.inConnector = nullptr;
  // q0 was sent and read, and its connection went on to q2: q3, q4 and /late wait.
  KJ_EXPECT(env.pool->getWaitingCount() == 3, env.pool->getWaitingCount());
  KJ_EXPECT(env.read(kj::mv(b)) == "1 /close-b");
  for (auto& w: waiting) {
    KJ_IF_SOME(p, w) {
      env.bounded(kj::mv(p));
    }
  }
  auto lateText = env.bounded(KJ_ASSERT_NONNULL(kj::mv(late)));
  KJ_EXPECT(lateText.endsWith(" /late"), lateText);
  KJ_ASSERT(served.size() == 4, served.size());
  KJ_EXPECT(served[0] == "0" && served[1] == "2" && served[2] == "3" && served[3] == "4",
      served[0], served[1], served[2], served[3]);
  KJ_EXPECT(s.waits == 6, s.waits);
  env.checkCounted("after the re-entrant connector");
}

KJ_TEST("pool bookkeeping: the server ends a connection in the event it is handed to a waiter; "
    "the waiter's request goes out on a new connection, counted once") {
  // connectionIdle() hands the connection to the waiter (it is then in no chain, kept only by the
  // waiter's promise); the server's close reaches the fetcher's idle watch before or after the
  // waiter's request starts. connectionClosed() must not try to unlink it from the idle chain,
  // and the request must be sent again elsewhere (nothing of it was written).
  for (int hook = 0; hook < 2; hook++) {
    KJ_CONTEXT(hook);
    Env env(limits(1));
    auto& s = env.pool->getStats();
    auto a = env.bounded(env.start("/a"));
    auto b = env.start("/b");
    env.turns();
    KJ_ASSERT(env.pool->getWaitingCount() == 1);
    char buffer[64];
    auto n = env.bounded(a.body->tryRead(buffer, 1, sizeof(buffer)).then([&](size_t n) {
      if (hook == 0) {
        env.upstream.end(0);  // in the hand-over's event
      } else {
        kj::evalLater([&]() { env.upstream.end(0); }).detach([](kj::Exception&&) {});
      }
      return n;
    }));
    KJ_EXPECT(kj::heapString(buffer, n) == "0 /a");
    a.body = nullptr;
    auto text = outcomeOf(env, kj::mv(b));
    KJ_EXPECT(text == "1 /b" || text == "0 /b", text);
    env.turns();
    KJ_EXPECT(s.droppedPeerClosedIdle + s.droppedStale + s.droppedFailed == 1,
        s.droppedPeerClosedIdle, s.droppedStale, s.droppedFailed);
    env.checkCounted("after /b");
  }
}

// =================================================================================================
// Destroying the pool with every kind of connection present

KJ_TEST("pool bookkeeping: destroyed with idle, busy and connecting connections present") {
  // Idle connections keep themselves (idleSelf) until the pool unlinks them; a busy one keeps
  // itself (busy) until detached. Destroying the pool must let every one of them go (LeakSanitizer
  // sees a self-reference that is never dropped), fail the request whose connect is pending, and
  // let the requests already sent finish.
  for (bool sweepDue: {false, true}) {
    KJ_CONTEXT(sweepDue);
    auto settings = limits(4);
    settings.idleTimeout = 10 * kj::MILLISECONDS;
    Env env(settings);
    auto& u = env.upstream;
    {
      auto r0 = env.bounded(env.start("/i0"));
      auto r1 = env.bounded(env.start("/i1"));
      env.read(kj::mv(r0));
      env.read(kj::mv(r1));
    }
    KJ_ASSERT(env.pool->getIdleCount() == 2);
    auto b0 = env.bounded(env.start("/b0"));   // takes 1
    auto b1 = env.bounded(env.start("/b1"));   // takes 0
    auto b2 = env.bounded(env.start("/b2"));   // opens 2
    auto connectHeld = kj::newPromiseAndFulfiller<void>();
    auto held = connectHeld.promise.fork();
    u.delayConnect = [&](kj::Promise<kj::Own<kj::AsyncIoStream>> stream) {
      return held.addBranch().then([stream = kj::mv(stream)]() mutable {
        return kj::mv(stream);
      });
    };
    auto c = env.start("/c");                  // opens 3: held
    env.turns();
    u.delayConnect = nullptr;
    KJ_EXPECT(env.read(kj::mv(b0)) == "1 /b0");  // 1 idle again
    KJ_ASSERT(env.pool->getIdleCount() == 1 && env.pool->getOpenCount() == 4,
        env.pool->getIdleCount(), env.pool->getOpenCount());
    if (sweepDue) env.timer.advanceTo(env.timer.now() + 10 * kj::MILLISECONDS);  // not run yet
    env.pool = nullptr;
    connectHeld.fulfiller->fulfill();
    auto cText = outcomeOf(env, kj::mv(c));
    KJ_EXPECT(cText.startsWith("failed: the ConnectionPool was destroyed"), cText);
    KJ_EXPECT(env.read(kj::mv(b1)) == "0 /b1");
    KJ_EXPECT(env.read(kj::mv(b2)) == "2 /b2");
    env.turns();
    KJ_EXPECT(u.open == 0, "a connection outlived the pool and its requests", u.open);
  }
}

KJ_TEST("pool bookkeeping: destroyed while waiters wait, one of them served by a connect in "
    "flight") {
  // A waiter served by serveWaiters() has left the chain: its connect belongs to the pool's tasks,
  // its request to the canceler. Destroying the pool at each point of that hand-over (connect
  // pending; connect done but the hand-over not yet run; hand-over run but not yet taken) must
  // fail the requests still waiting, unlink every Waiter from the dead pool's chain before it
  // goes, and leave no connection behind.
  for (int point = 0; point < 4; point++) {
    KJ_CONTEXT(point);
    Env env(limits(2));
    auto& u = env.upstream;
    auto b0 = env.bounded(env.start("/b0"));
    auto b1 = env.bounded(env.start("/close-b1"));
    auto w1 = env.start("/w1");
    auto w2 = env.start("/w2");
    env.turns();
    KJ_ASSERT(env.pool->getWaitingCount() == 2);
    auto connectHeld = kj::newPromiseAndFulfiller<void>();
    auto held = connectHeld.promise.fork();
    u.delayConnect = [&](kj::Promise<kj::Own<kj::AsyncIoStream>> stream) {
      return held.addBranch().then([stream = kj::mv(stream)]() mutable {
        return kj::mv(stream);
      });
    };
    KJ_EXPECT(env.read(kj::mv(b1)) == "1 /close-b1");  // closes: w1's connect starts
    env.turns();
    u.delayConnect = nullptr;
    KJ_ASSERT(env.pool->getWaitingCount() == 1 && env.pool->getOpenCount() == 2,
        env.pool->getWaitingCount(), env.pool->getOpenCount());
    switch (point) {
      case 0: break;                                              // connect pending
      case 1: connectHeld.fulfiller->fulfill(); break;            // done, not yet handed over
      case 2:
        connectHeld.fulfiller->fulfill();
        kj::evalLater([]() {}).wait(env.ws);                       // some of the hand-over ran
        break;
      case 3:
        connectHeld.fulfiller->fulfill();
        env.turns();                                               // /w1 sent
        break;
    }
    env.pool = nullptr;
    if (point == 0) connectHeld.fulfiller->fulfill();
    auto t1 = outcomeOf(env, kj::mv(w1));
    auto t2 = outcomeOf(env, kj::mv(w2));
    KJ_EXPECT(t1 == "2 /w1" || t1.startsWith("failed: the ConnectionPool was destroyed"), t1);
    KJ_EXPECT(t2.startsWith("failed: the ConnectionPool was destroyed"), t2);
    KJ_EXPECT(env.read(kj::mv(b0)) == "0 /b0");
    env.turns();
    KJ_EXPECT(u.open == 0, "a connection outlived the pool and its requests", u.open);
  }
}

// =================================================================================================
// A thousand idle connections and a thousand waiting requests

unsigned scaled(unsigned n) {
  // SCALE_FACTOR=k multiplies the counts of the cases below, to measure by hand how their cost
  // grows (src/bench/README.md, item 30); the tests run with the defaults.
  const char* f = getenv("SCALE_FACTOR");
  return f == nullptr ? n : n * atoi(f);
}

KJ_TEST("pool bookkeeping: a thousand idle connections are reused newest first, and those the "
    "server ends or that expire together are each dropped and counted once") {
  const unsigned N = scaled(1000);
  auto settings = limits(N);
  settings.idleTimeout = 60 * kj::SECONDS;
  Env env(settings);
  auto& stats = env.pool->getStats();

  // N requests at once open N connections; their bodies, read in order, give them back in order.
  kj::Vector<kj::Promise<Response>> responses;
  for (unsigned i = 0; i < N; i++) responses.add(env.start(kj::str("/", i)));
  kj::Vector<unsigned> idleOrder;  // connection numbers, oldest idle first
  for (auto& response: responses) {
    idleOrder.add(connectionOf(env.read(env.bounded(kj::mv(response)))));
    env.timer.advanceTo(env.timer.now() + 1 * kj::MILLISECONDS);
  }
  env.turns();
  KJ_ASSERT(stats.connectionsOpened == N && env.pool->getIdleCount() == N);

  auto takeNewest = [&](unsigned count, kj::ArrayPtr<const unsigned> expected) {
    // `count` requests at once take the `count` newest; given back in reverse, they return to
    // the chain in the order they had.
    kj::Vector<kj::Promise<Response>> taken;
    for (unsigned i = 0; i < count; i++) taken.add(env.start("/again"));
    kj::Vector<Response> held;
    for (auto& promise: taken) held.add(env.bounded(kj::mv(promise)));
    for (unsigned i = count; i-- > 0;) {
      auto body = env.read(kj::mv(held[i]));
      KJ_EXPECT(connectionOf(body) == expected[i], i, body, expected[i]);
    }
  };
  kj::Vector<unsigned> newestTen;
  for (unsigned i = 0; i < 10; i++) newestTen.add(idleOrder[N - 1 - i]);
  takeNewest(10, newestTen);
  KJ_EXPECT(stats.connectionsOpened == N && stats.reuses == 10);

  // The server ends every other idle connection, the oldest first, in one event.
  kj::Vector<unsigned> kept;
  for (unsigned i = 0; i < N; i++) {
    if (i % 2 == 0) {
      env.upstream.end(idleOrder[i]);
    } else {
      kept.add(idleOrder[i]);
    }
  }
  env.turns();
  KJ_EXPECT(stats.droppedPeerClosedIdle == N / 2, stats.droppedPeerClosedIdle);
  KJ_EXPECT(env.pool->getIdleCount() == N / 2 && env.pool->getOpenCount() == N / 2,
      env.pool->getIdleCount(), env.pool->getOpenCount());
  env.checkCounted("after the server ended half");

  // The survivors keep their order: the newest five are the newest five kept.
  kj::Vector<unsigned> newestKept;
  for (unsigned i = 0; i < 5; i++) newestKept.add(kept[kept.size() - 1 - i]);
  takeNewest(5, newestKept);
  KJ_EXPECT(stats.connectionsOpened == N);

  // All of them expire together, in one sweep.
  env.advance(settings.idleTimeout);
  KJ_EXPECT(stats.droppedIdleTimeout == N / 2, stats.droppedIdleTimeout);
  KJ_EXPECT(stats.dropped() == N, stats.dropped());
  env.checkCounted("after the rest expired");
  KJ_EXPECT(env.pool->getOpenCount() == 0);

  // And the pool works as before.
  KJ_EXPECT(env.get("/last") == kj::str(N, " /last"));
}

KJ_TEST("pool bookkeeping: a thousand waiting requests, a third of them cancelled, are served in "
    "the order they came") {
  const unsigned N = scaled(1000);
  auto settings = limits(1);
  settings.maxWaiting = N;
  Env env(settings);
  auto& stats = env.pool->getStats();

  // The only connection stays busy until its body is read.
  auto first = env.bounded(env.start("/first"));
  kj::Vector<unsigned> served;
  kj::Vector<kj::Maybe<kj::Promise<void>>> waiting;
  for (unsigned i = 0; i < N; i++) {
    waiting.add(env.start(kj::str("/", i)).then([&served, i](Response&& r) {
      served.add(i);
      return r.body->readAllText().ignoreResult().attach(kj::mv(r.body));
    }).eagerlyEvaluate(nullptr));
  }
  env.turns();
  KJ_EXPECT(env.pool->getWaitingCount() == N && stats.waits == N, env.pool->getWaitingCount());

  // One more is refused at once.
  auto refused = env.start("/refused");
  KJ_EXPECT(refused.poll(env.ws));
  KJ_EXPECT_THROW_MESSAGE("saturated", refused.wait(env.ws));

  // A third give up while they wait: at the front, the back and all through the queue.
  kj::Vector<unsigned> expected;
  for (unsigned i = 0; i < N; i++) {
    if (i % 3 == 1) {
      waiting[i] = nullptr;
    } else {
      expected.add(i);
    }
  }
  env.turns();
  KJ_EXPECT(env.pool->getWaitingCount() == expected.size(), env.pool->getWaitingCount());

  // The connection is handed down the queue, one request at a time, in order.
  KJ_EXPECT(env.read(kj::mv(first)) == "0 /first");
  for (auto& w: waiting) {
    KJ_IF_SOME(promise, w) {
      env.bounded(kj::mv(promise));
    }
  }
  KJ_ASSERT(served.size() == expected.size(), served.size());
  for (size_t i = 0; i < served.size(); i++) {
    KJ_ASSERT(served[i] == expected[i], i, served[i], expected[i]);
  }
  KJ_EXPECT(stats.connectionsOpened == 1 && stats.reuses == expected.size(), stats.reuses);
  env.checkCounted("after the queue was served");
}

}  // namespace
}  // namespace sockfetch
