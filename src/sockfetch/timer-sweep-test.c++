// ConnectionPool's three timers (Settings::idleTimeout, waitTimeout, connectTimeout) swept across
// the event-loop turns of everything they can race: a connect completing, a waiter being handed a
// returning connection, an idle connection being handed out, an idle connection's server closing
// it or sending a byte, a response completing and giving its connection back while another
// connection expires, a retry starting as the idle connection it would close expires, and the
// pool being destroyed just after a timer fell due. Each timer is moved to exactly its deadline,
// one tick (1 ns) before it and one tick after it, and the intervention is made after 0, 1, 2, ...
// turns of the event loop (kj::EventLoop::run(1) per turn).
//
// After each run: the request is served or fails with exactly one error (never both, never a
// hang), no connection is handed to two requests or lost from the counts (connectionsOpened ==
// open + dropped(), open == idle once nothing is in flight, the upstream agrees), an idle
// connection past idleTimeout is never handed out, and a timeout's error names the setting to
// change. Everything runs on in-process pipes and a kj::TimerImpl moved by hand
// (pipe-pool-env.h); the suite also runs under ASan+UBSan.

#include "pool.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/pipe-pool-env.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/vector.h>
#include <string.h>

namespace sockfetch {
namespace {

using Response = kj::HttpClient::Response;
using Env = test::PipePoolEnv;
using test::limits;

constexpr kj::Duration TICK = 1 * kj::NANOSECONDS;
constexpr int DELTAS[] = {-1, 0, 1};  // in ticks, around a deadline
constexpr unsigned MAX_TURNS = 12;

bool contains(kj::StringPtr haystack, kj::StringPtr needle) {
  return strstr(haystack.cStr(), needle.cStr()) != nullptr;
}

kj::String tagged(kj::Exception&& e) {
  return kj::str(e.getType() == kj::Exception::Type::OVERLOADED ? "overloaded: "
      : e.getType() == kj::Exception::Type::DISCONNECTED ? "disconnected: " : "failed: ",
      e.getDescription());
}

kj::Promise<kj::String> textOf(kj::Promise<Response>&& promise) {
  // The body of the response, or its error tagged by type; pursued at once. A promise settles
  // once: a request that was both served and failed would show as a body plus a wrong count.
  return promise.then([](Response&& r) {
    return r.body->readAllText().attach(kj::mv(r.body));
  }, [](kj::Exception&& e) { return tagged(kj::mv(e)); }).eagerlyEvaluate(nullptr);
}

void runTurns(Env& env, unsigned k) {
  for (unsigned i = 0; i < k; i++) env.loop.run(1);
}

bool isBody(kj::StringPtr text) {
  return text.size() > 0 && text[0] >= '0' && text[0] <= '9';
}

void expectSeenOnce(Env& env, kj::StringPtr body) {
  // The upstream saw this request exactly once (a connection is never given two requests at
  // once, and a request is never sent twice).
  unsigned n = 0;
  for (auto& s: env.upstream.seen) {
    if (s == body) ++n;
  }
  KJ_EXPECT(n == 1, body, n);
}

// =================================================================================================
// An idle connection handed out as its idle time runs out

KJ_TEST("a request made in the turn the clock reaches an idle connection's expiry, before the "
    "sweep ran, is not handed that expired connection") {
  // Contract (pool.h, Settings::idleTimeout): "An idle connection unused this long is closed";
  // the sweep and readopt() take idleSince + idleTimeout <= now as expired, and so does handing
  // out an idle connection, however the sweep's continuation is ordered against the request
  // (with a real event loop the clock is read once per poll, and an I/O event that queues a
  // request in that same poll runs before or after the sweep's continuation). At the deadline
  // and one tick after it, the request goes out on a new connection ("1 /x") and
  // droppedIdleTimeout == 1, at every turn (at k = 0 the sweep has not run); one tick before,
  // connection 0 is reused.
  for (int delta: DELTAS) {
    for (unsigned k = 0; k < 4; k++) {
      KJ_CONTEXT(delta, k);
      auto settings = limits(2);
      settings.idleTimeout = 100 * kj::MILLISECONDS;
      Env env(settings);
      auto& s = env.pool->getStats();
      auto t0 = env.timer.now();
      KJ_ASSERT(env.get("/a") == "0 /a");  // idle since t0 (the clock did not move)
      env.timer.advanceTo(t0 + settings.idleTimeout + delta * TICK);
      runTurns(env, k);
      auto body = env.get("/x");
      if (delta >= 0) {
        KJ_EXPECT(body == "1 /x", "an expired idle connection was handed out", body);
        KJ_EXPECT(s.droppedIdleTimeout == 1, s.droppedIdleTimeout);
      } else {
        KJ_EXPECT(body == "0 /x", body);
        KJ_EXPECT(s.reuses == 1 && s.droppedIdleTimeout == 0, s.reuses, s.droppedIdleTimeout);
      }
      env.checkCounted("after /x");
    }
  }
}

KJ_TEST("with idleTimeout 0 (\"at once\") a connection given back by a response is not reused, "
    "even while the clock has not moved") {
  // Contract (pool.h): "0 means at once": an idle connection unused 0 long is closed, so no
  // connection is ever reused (as readopt() closes one given back unused). The sweep scheduled at
  // timer.atTime(now) fires only when the clock next moves; until then handing out checks the
  // expiry itself: /b goes out on a new connection ("1 /b").
  auto settings = limits(1);
  settings.idleTimeout = 0 * kj::SECONDS;
  Env env(settings);
  auto& s = env.pool->getStats();
  KJ_ASSERT(env.get("/a") == "0 /a");
  auto body = env.get("/b");
  KJ_EXPECT(body == "1 /b", "idleTimeout 0 let a connection be reused", body, s.reuses);
  env.advance(1 * kj::MILLISECONDS);
  env.checkCounted("at the end");
}

// =================================================================================================
// waitTimeout against a waiter being handed the connection that comes back

KJ_TEST("timer sweep: waitTimeout at, before and after its deadline, in every turn of the "
    "response that frees the connection: served or OVERLOADED, once; the connection stays") {
  // Contract: a waiting request fails with OVERLOADED once it waited waitTimeout, else it is
  // served; it settles exactly once, the connection it would have had is never lost or closed
  // (it serves /c afterwards), and stats.overloaded counts exactly the failures. One tick before
  // the deadline the request is always served. The error says what was waited for and which
  // setting to change.
  unsigned served = 0, overloaded = 0;
  for (int delta: DELTAS) {
    for (unsigned k = 0; k <= MAX_TURNS; k++) {
      KJ_CONTEXT(delta, k);
      auto settings = limits(1);
      settings.waitTimeout = 50 * kj::MILLISECONDS;
      Env env(settings);
      auto& s = env.pool->getStats();
      auto a = env.bounded(env.start("/a"));
      auto t0 = env.timer.now();
      auto b = textOf(env.start("/b"));
      env.turns();
      KJ_ASSERT(env.pool->getWaitingCount() == 1);
      auto readA = a.body->readAllText().attach(kj::mv(a.body)).eagerlyEvaluate(nullptr);
      runTurns(env, k);
      env.timer.advanceTo(t0 + settings.waitTimeout + delta * TICK);
      KJ_EXPECT(env.bounded(kj::mv(readA)) == "0 /a");
      auto outcome = env.bounded(kj::mv(b));
      if (outcome == "0 /b") {
        ++served;
        expectSeenOnce(env, "0 /b");
        KJ_EXPECT(s.overloaded == 0, s.overloaded);
      } else {
        ++overloaded;
        KJ_EXPECT(outcome.startsWith("overloaded: "), outcome);
        KJ_EXPECT(delta >= 0, "failed before its waitTimeout", outcome);
        KJ_EXPECT(contains(outcome, "waited 50 ms for a free connection"), outcome);
        KJ_EXPECT(contains(outcome, "maxConnections"), outcome);
        KJ_EXPECT(s.overloaded == 1, s.overloaded);
        KJ_EXPECT(env.upstream.seen.size() == 1, env.upstream.seen.size());
      }
      KJ_EXPECT(s.dropped() == 0, s.dropped());
      env.checkCounted(kj::str("after /b: ", outcome));
      KJ_EXPECT(env.get("/c") == "0 /c");
      KJ_EXPECT(s.connectionsOpened == 1, s.connectionsOpened);
      env.checkCounted("after /c");
    }
  }
  // The sweep reached both ends.
  KJ_EXPECT(served > 0 && overloaded > 0, served, overloaded);
}

// =================================================================================================
// connectTimeout against the connect completing, also for a waiter whose waitTimeout falls due
// at the same instant

struct DelayedConnects {
  // Makes every connect complete only once the pool's timer reaches `readyAt`.
  DelayedConnects(Env& env, kj::TimePoint readyAt) {
    env.upstream.delayConnect = [&env, readyAt](kj::Promise<kj::Own<kj::AsyncIoStream>> stream) {
      return env.timer.atTime(readyAt).then([stream = kj::mv(stream)]() mutable {
        return kj::mv(stream);
      });
    };
  }
};

void stepClockThrough(Env& env, kj::TimePoint deadline) {
  // One tick before, at, and one tick after `deadline`, each followed by a few turns.
  for (int delta: DELTAS) {
    env.timer.advanceTo(deadline + delta * TICK);
    env.turns(5);
  }
}

void expectConnectsCounted(Env& env) {
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.connectionsOpened + s.connectFailures == env.upstream.connects,
      s.connectionsOpened, s.connectFailures, env.upstream.connects);
}

KJ_TEST("timer sweep: a connect completing one tick before, at, or one tick after "
    "connectTimeout: served, or OVERLOADED naming connectTimeout; the stream never leaks") {
  // Contract (Settings::connectTimeout): opening a connection that takes longer fails OVERLOADED
  // (try later / raise the setting). Exactly one outcome; a connect the timeout beat is counted
  // as a connect failure and its stream is closed; one that completed first serves the request.
  unsigned served = 0, timedOut = 0;
  for (int delta: DELTAS) {
    KJ_CONTEXT(delta);
    auto settings = limits(1);
    settings.connectTimeout = 40 * kj::MILLISECONDS;
    Env env(settings);
    auto& s = env.pool->getStats();
    auto t0 = env.timer.now();
    DelayedConnects delay(env, t0 + settings.connectTimeout + delta * TICK);
    auto a = textOf(env.start("/a"));
    env.turns();
    KJ_ASSERT(env.upstream.connects == 1);
    stepClockThrough(env, t0 + settings.connectTimeout);
    auto outcome = env.bounded(kj::mv(a));
    if (outcome == "0 /a") {
      ++served;
      KJ_EXPECT(delta <= 0, "served by a connect that completed after connectTimeout");
      KJ_EXPECT(s.connectFailures == 0, s.connectFailures);
    } else {
      ++timedOut;
      KJ_EXPECT(delta >= 0, "timed out before connectTimeout", outcome);
      KJ_EXPECT(outcome.startsWith("overloaded: "), outcome);
      KJ_EXPECT(contains(outcome, "timed out after 40 ms"), outcome);
      KJ_EXPECT(contains(outcome, "connectTimeout"), outcome);
      KJ_EXPECT(s.connectFailures == 1 && s.connectionsOpened == 0, s.connectFailures);
      KJ_EXPECT(env.upstream.seen.size() == 0, env.upstream.seen.size());
    }
    expectConnectsCounted(env);
    env.checkCounted(kj::str("after /a: ", outcome));
  }
  KJ_EXPECT(served > 0 && timedOut > 0, served, timedOut);
}

KJ_TEST("timer sweep: a waiter's waitTimeout, the connectTimeout of the connect opened for it and "
    "the connect itself all fall due at one instant (+/- a tick): one outcome, counts exact") {
  // A request waits from t0 (waitTimeout W); at t0 the busy connection closes and serveWaiters()
  // opens a new one for it (connectTimeout W, armed at t0 too), whose connect completes at
  // t0 + W + delta. Contract: exactly one of served / OVERLOADED (waited, naming maxConnections) /
  // OVERLOADED (connect timed out, naming connectTimeout); the new connection, if it opened, is
  // kept (idle) or serves the request, never lost; a connect cut short is counted as a failure.
  for (int delta: DELTAS) {
    KJ_CONTEXT(delta);
    auto settings = limits(1);
    settings.waitTimeout = 30 * kj::MILLISECONDS;
    settings.connectTimeout = 30 * kj::MILLISECONDS;
    Env env(settings);
    auto& s = env.pool->getStats();
    auto a = env.bounded(env.start("/close-a"));
    auto t0 = env.timer.now();
    auto b = textOf(env.start("/b"));
    env.turns();
    KJ_ASSERT(env.pool->getWaitingCount() == 1);
    DelayedConnects delay(env, t0 + 30 * kj::MILLISECONDS + delta * TICK);
    KJ_EXPECT(env.read(kj::mv(a)) == "0 /close-a");
    env.turns();
    KJ_ASSERT(env.upstream.connects == 2, env.upstream.connects);
    stepClockThrough(env, t0 + 30 * kj::MILLISECONDS);
    auto outcome = env.bounded(kj::mv(b));
    KJ_CONTEXT(outcome);
    if (isBody(outcome)) {
      KJ_EXPECT(outcome == "1 /b");
      KJ_EXPECT(delta < 0, "served after its waitTimeout");
      KJ_EXPECT(s.overloaded == 0 && s.connectFailures == 0, s.overloaded, s.connectFailures);
    } else {
      KJ_EXPECT(delta >= 0, "failed before any deadline");
      KJ_EXPECT(outcome.startsWith("overloaded: "));
      bool waited = contains(outcome, "waitTimeout");
      bool connectTimedOut = contains(outcome, "connectTimeout");
      KJ_EXPECT(waited != connectTimedOut, "one error, saying one thing");
      KJ_EXPECT(s.overloaded == (waited ? 1 : 0), s.overloaded);
      KJ_EXPECT(env.upstream.seen.size() == 1, env.upstream.seen.size());
    }
    env.upstream.delayConnect = nullptr;
    expectConnectsCounted(env);
    env.checkCounted("after the race");
    // Whatever the outcome, a next request is served, and a connection left idle is reused
    // (the upstream numbers connections by connect attempt).
    unsigned expected = env.pool->getIdleCount() > 0 ? 1 : env.upstream.connects;
    KJ_EXPECT(env.pool->getIdleCount() == 0 || s.connectionsOpened == 2);
    auto c = env.get("/c");
    KJ_EXPECT(c == kj::str(expected, " /c"), c, s.connectionsOpened);
    env.checkCounted("after /c");
  }
}

// =================================================================================================
// The idle sweep against the idle watch (the server closing the connection, or poking it)

KJ_TEST("timer sweep: an idle connection's server closes it, or sends a byte, in every turn around "
    "its idle expiry: it is dropped once, with one reason, and never handed out") {
  // Contract: "every drop has a reason, counted" (once), and a connection that expired, was
  // closed by its server or poisoned is never handed out. The expiry (moved to the deadline or a
  // tick either side) and the server's action are ordered both ways, k turns apart.
  unsigned byTimeout = 0, byWatch = 0;
  for (int poke = 0; poke < 2; poke++) {
    for (int serverFirst = 0; serverFirst < 2; serverFirst++) {
      for (int delta: DELTAS) {
        for (unsigned k = 0; k <= 6; k++) {
          KJ_CONTEXT(poke, serverFirst, delta, k);
          auto settings = limits(2);
          settings.idleTimeout = 100 * kj::MILLISECONDS;
          Env env(settings);
          auto& s = env.pool->getStats();
          auto t0 = env.timer.now();
          KJ_ASSERT(env.get("/a") == "0 /a");
          auto serverActs = [&]() {
            if (poke) {
              env.upstream.poke(0, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            } else {
              env.upstream.end(0);
            }
          };
          auto clockMoves = [&]() {
            env.timer.advanceTo(t0 + settings.idleTimeout + delta * TICK);
          };
          if (serverFirst) serverActs(); else clockMoves();
          runTurns(env, k);
          if (serverFirst) clockMoves(); else serverActs();
          env.turns();
          uint64_t watch = poke ? s.droppedUnsolicitedBytes : s.droppedPeerClosedIdle;
          KJ_EXPECT(watch + s.droppedIdleTimeout == 1, watch, s.droppedIdleTimeout);
          KJ_EXPECT(s.dropped() == 1, s.dropped());
          KJ_EXPECT(delta >= 0 || s.droppedIdleTimeout == 0, "expired early");
          byTimeout += s.droppedIdleTimeout;
          byWatch += watch;
          env.checkCounted("after the race");
          KJ_EXPECT(env.upstream.open == 0, env.upstream.open);
          KJ_EXPECT(env.get("/x") == "1 /x");
          KJ_EXPECT(s.retries == 0, s.retries);
          env.checkCounted("after /x");
        }
      }
    }
  }
  KJ_EXPECT(byTimeout > 0 && byWatch > 0, byTimeout, byWatch);
}

// =================================================================================================
// A response giving its connection back while another connection expires

KJ_TEST("timer sweep: a response ends in every turn around another idle connection's expiry: the "
    "expired one goes, the returning one is idle from when it returned") {
  // Contract: idle time counts from when a connection last came back from a request; the sweep
  // closes exactly those past idleTimeout. Connection 0 is idle from t0; connection 1 carries
  // /b, whose body is read over k turns while the clock moves to t0 + idleTimeout + delta.
  // Connection 1 must be kept unless it had come back by t0 (then it expires with 0); the next
  // request takes connection 1 if kept, else opens a new one.
  for (int delta: DELTAS) {
    for (unsigned k = 0; k <= MAX_TURNS; k++) {
      KJ_CONTEXT(delta, k);
      auto settings = limits(3);
      settings.idleTimeout = 100 * kj::MILLISECONDS;
      Env env(settings);
      auto& s = env.pool->getStats();
      auto t0 = env.timer.now();
      auto a = env.bounded(env.start("/a"));
      auto b = env.bounded(env.start("/b"));
      KJ_ASSERT(env.read(kj::mv(a)) == "0 /a");
      auto readB = b.body->readAllText().attach(kj::mv(b.body)).eagerlyEvaluate(nullptr);
      runTurns(env, k);
      // Connection 1 came back (idle since t0) before the clock moved, or comes back after.
      bool returnedAtT0 = env.pool->getIdleCount() == 2;
      env.timer.advanceTo(t0 + settings.idleTimeout + delta * TICK);
      KJ_EXPECT(env.bounded(kj::mv(readB)) == "1 /b");
      env.turns();
      bool zeroExpired = delta >= 0;
      bool oneExpired = returnedAtT0 && delta >= 0;
      KJ_EXPECT(s.droppedIdleTimeout == unsigned(zeroExpired) + unsigned(oneExpired),
          s.droppedIdleTimeout, zeroExpired, oneExpired);
      env.checkCounted("after /b came back");
      auto c = env.get("/c");
      KJ_EXPECT(c == (oneExpired ? "2 /c" : "1 /c"), c);
      env.checkCounted("after /c");
    }
  }
}

// =================================================================================================
// A retry starting as another idle connection expires

KJ_TEST("timer sweep: a request whose idle connection its server closed, sent elsewhere in every "
    "turn around the expiry of the other idle connection: served once, each drop counted once") {
  // maxConnections 2: connection 0 idle since t0, connection 1 idle since t0 + 10 ms (the newest,
  // so reused first). The server closes connection 1 as /x is made (no turn ran since), so the
  // pool finds it lost (on pipes, by its idle watch, before /x is written) and sends the GET on
  // another connection (no retry: nothing was sent), while the clock reaches connection 0's
  // expiry (+/- a tick) k turns after /x was made. Contract: /x is served exactly once, on
  // connection 0 if it had not expired when /x went out again, else on a new one (2);
  // connection 1 is counted once; connection 0 expires exactly when due, or serves /x, never
  // both, never closed twice; counts exact.
  for (int delta: DELTAS) {
    for (unsigned k = 0; k <= MAX_TURNS; k++) {
      KJ_CONTEXT(delta, k);
      auto settings = limits(2);
      settings.idleTimeout = 100 * kj::MILLISECONDS;
      Env env(settings);
      auto& s = env.pool->getStats();
      auto t0 = env.timer.now();
      auto a = env.bounded(env.start("/a"));
      auto b = env.bounded(env.start("/b"));
      KJ_ASSERT(env.read(kj::mv(a)) == "0 /a");
      env.advance(10 * kj::MILLISECONDS);
      KJ_ASSERT(env.read(kj::mv(b)) == "1 /b");
      env.upstream.end(1);  // not yet seen by the pool: no turn has run
      auto x = textOf(env.start("/x"));
      runTurns(env, k);
      env.timer.advanceTo(t0 + settings.idleTimeout + delta * TICK);
      auto outcome = env.bounded(kj::mv(x));
      env.turns();
      bool onZero = outcome == "0 /x";
      KJ_EXPECT(onZero || outcome == "2 /x", outcome);
      expectSeenOnce(env, outcome);
      // Connection 1 is found lost before /x is written (the idle watch saw the end: /x goes on
      // another connection, no retry) or after (stale: /x is sent once more, on a new one);
      // either way it is counted once.
      KJ_EXPECT(s.retries == unsigned(s.droppedStale), s.retries, s.droppedStale);
      KJ_EXPECT(s.droppedStale + s.droppedPeerClosedIdle == 1, s.droppedStale,
          s.droppedPeerClosedIdle, s.droppedFailed);
      KJ_EXPECT(!(onZero && s.droppedIdleTimeout > 0), "an expired connection was handed out");
      KJ_EXPECT(s.droppedIdleTimeout == unsigned(delta >= 0 && !onZero), s.droppedIdleTimeout);
      KJ_EXPECT(s.droppedForRetry == 0, s.droppedForRetry);
      KJ_EXPECT(env.pool->getIdleCount() == (onZero ? 1 : delta >= 0 ? 1 : 2),
          env.pool->getIdleCount());
      env.checkCounted(kj::str("after /x: ", outcome));
    }
  }
}

// =================================================================================================
// The pool destroyed just after a timer fell due

KJ_TEST("timer sweep: the pool destroyed k turns after a waiter's waitTimeout or a connect's "
    "connectTimeout fell due: one error each, the request in flight finishes, nothing leaks") {
  // Contract (pool.h, Lifetimes): destroying the pool fails requests not yet sent (DISCONNECTED,
  // "the ConnectionPool was destroyed") and lets requests already sent finish. A request whose
  // timer fell due just before is failed by one or the other, never both, never left hanging;
  // afterwards every connection closes.
  unsigned timedOutRuns = 0, destroyedRuns = 0;
  for (int which = 0; which < 2; which++) {
    for (int delta: DELTAS) {
      for (unsigned k = 0; k <= 6; k++) {
        KJ_CONTEXT(which ? "connectTimeout" : "waitTimeout", delta, k);
        auto settings = limits(2);
        settings.waitTimeout = 50 * kj::MILLISECONDS;
        settings.connectTimeout = 50 * kj::MILLISECONDS;
        if (which == 0) settings.maxConnections = 1;
        Env env(settings);
        auto a = env.bounded(env.start("/a"));  // connection 0, its body unread
        auto t0 = env.timer.now();
        kj::Maybe<DelayedConnects> delay;
        if (which == 1) delay.emplace(env, t0 + 1000 * kj::SECONDS);  // a connect that hangs
        auto b = textOf(env.start("/b"));
        env.turns();
        if (which == 0) {
          KJ_ASSERT(env.pool->getWaitingCount() == 1);
        } else {
          KJ_ASSERT(env.upstream.connects == 2);
        }
        env.timer.advanceTo(t0 + 50 * kj::MILLISECONDS + delta * TICK);
        runTurns(env, k);
        env.pool = nullptr;
        auto outcome = env.bounded(kj::mv(b));
        bool timedOut = outcome.startsWith("overloaded: ");
        bool destroyed = outcome.startsWith("disconnected: ") &&
            contains(outcome, "the ConnectionPool was destroyed");
        KJ_EXPECT(timedOut != destroyed, outcome);
        (timedOut ? timedOutRuns : destroyedRuns)++;
        KJ_EXPECT(delta >= 0 || destroyed, outcome);
        KJ_EXPECT(env.read(kj::mv(a)) == "0 /a");
        env.upstream.delayConnect = nullptr;
        env.turns();
        KJ_EXPECT(env.upstream.open == 0, env.upstream.open);
        KJ_EXPECT(env.upstream.seen.size() == 1, env.upstream.seen.size());
      }
    }
  }
  // The sweep reached both ends: the timer's error, and the pool's.
  KJ_EXPECT(timedOutRuns > 0 && destroyedRuns > 0, timedOutRuns, destroyedRuns);
}

// =================================================================================================
// What the timeouts' errors say

KJ_TEST("a sub-millisecond waitTimeout or connectTimeout is reported as it is, not as \"0 ms\"") {
  // Contract: every error says what happened (and what to do). With waitTimeout or
  // connectTimeout of 500 us, the error says the request waited (or connected) 500 us, in kj's
  // form ("500μs"), not "0 ms", which reads as if the timeout were 0.
  for (int which = 0; which < 2; which++) {
    KJ_CONTEXT(which ? "connectTimeout" : "waitTimeout");
    auto settings = limits(1);
    settings.waitTimeout = 500 * kj::MICROSECONDS;
    settings.connectTimeout = 500 * kj::MICROSECONDS;
    Env env(settings);
    kj::Maybe<Response> a;
    kj::Maybe<DelayedConnects> delay;
    if (which == 0) {
      a = env.bounded(env.start("/a"));
    } else {
      delay.emplace(env, env.timer.now() + 1000 * kj::SECONDS);
    }
    auto b = textOf(env.start("/b"));
    env.turns();
    env.advance(1 * kj::MILLISECONDS);
    auto outcome = env.bounded(kj::mv(b));
    KJ_EXPECT(outcome.startsWith("overloaded: "), outcome);
    KJ_EXPECT(!contains(outcome, " 0 ms"), "the error misstates the timeout", outcome);
    env.upstream.delayConnect = nullptr;
  }
}

KJ_TEST("the waitTimeout error names waitTimeout, and says so when the wait ended while a "
    "connection was being opened for the request rather than blaming maxConnections") {
  // Contract: every error says what happened and what to do, naming the setting to change (as
  // the connectTimeout error names connectTimeout, and the saturated-queue error maxConnections
  // and maxWaiting). maxConnections 1, waitTimeout 30 ms. (a) /b waits behind a busy connection;
  // (b) /b waits, the busy connection closes and the pool starts opening a new one for /b, whose
  // connect is slow (connectTimeout 1000 s): the 30 ms run out first. The OVERLOADED error names
  // waitTimeout (the setting that ended the wait), and in (b) says a connection was being opened
  // for it (raising maxConnections would not help there).
  for (int connecting = 0; connecting < 2; connecting++) {
    KJ_CONTEXT(connecting);
    auto settings = limits(1);
    settings.waitTimeout = 30 * kj::MILLISECONDS;
    Env env(settings);
    auto a = env.bounded(env.start(connecting ? "/close-a" : "/a"));
    auto b = textOf(env.start("/b"));
    env.turns();
    KJ_ASSERT(env.pool->getWaitingCount() == 1);
    kj::Maybe<DelayedConnects> delay;
    kj::Maybe<Response> held;
    if (connecting) {
      delay.emplace(env, env.timer.now() + 1000 * kj::SECONDS);
      KJ_ASSERT(env.read(kj::mv(a)) == "0 /close-a");
      env.turns();
      KJ_ASSERT(env.upstream.connects == 2 && env.pool->getWaitingCount() == 0);
    } else {
      held = kj::mv(a);
    }
    env.advance(30 * kj::MILLISECONDS);
    auto outcome = env.bounded(kj::mv(b));
    KJ_EXPECT(outcome.startsWith("overloaded: waited 30 ms"), outcome);
    KJ_EXPECT(contains(outcome, "waitTimeout"), "the error does not name waitTimeout", outcome);
    if (connecting) {
      KJ_EXPECT(contains(outcome, "being opened"),
          "the error does not say a connection was being opened for the request", outcome);
    }
    env.upstream.delayConnect = nullptr;
  }
}

}  // namespace
}  // namespace sockfetch
