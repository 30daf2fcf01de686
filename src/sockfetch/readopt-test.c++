// ConnectionPool::Connection::~Connection() readopting an idle fetcher (ConnectionPool::readopt):
// a connection handed to a request that gives up before sending anything on it goes back to the
// pool in a new Connection. Adversarial cases: the hand-over racing cancellations, wait timeouts
// (a chain of them in one event), the idle watch (server close, unsolicited bytes), the
// settings that retire a returning connection (neverReuse, maxRequestsPerConnection, the idle
// limit), the idle timeout, WebSocket attempts, and the pool destroyed around it. After each, the
// counts must add up: connectionsOpened == open + dropped().
//
// In-process pipes and a kj::TimerImpl the test advances by hand (pipe-pool-env.h): the order of
// events is deterministic, nothing depends on wall time.

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

kj::String tagged(kj::Exception&& e) {
  return kj::str(e.getType() == kj::Exception::Type::OVERLOADED ? "overloaded: " : "failed: ",
      e.getDescription());
}

kj::Promise<kj::String> textOf(kj::Promise<Response>&& promise) {
  return promise.then([](Response&& r) {
    return r.body->readAllText().attach(kj::mv(r.body));
  }, [](kj::Exception&& e) { return tagged(kj::mv(e)); }).eagerlyEvaluate(nullptr);
}

kj::String readThen(Env& env, Response& a, kj::Function<void()> inHandOverEvent) {
  // Reads `a`'s body (short: one read takes all of it); `inHandOverEvent` runs in the event whose
  // end-of-body continuation gave the connection back (and so handed it to a waiter).
  char buffer[64];
  auto n = env.bounded(a.body->tryRead(buffer, 1, sizeof(buffer)).then([&](size_t n) {
    inHandOverEvent();
    return n;
  }));
  a.body = nullptr;
  return kj::heapString(buffer, n);
}

// =================================================================================================

KJ_TEST("readopt: a WebSocket attempt dropped right after it took the idle connection gives it "
    "back; the next request reuses it, counts exact") {
  Env env(limits(2));
  auto& s = env.pool->getStats();
  KJ_EXPECT(env.get("/a") == "0 /a");
  KJ_ASSERT(env.pool->getIdleCount() == 1);
  for (int i = 0; i < 3; i++) {
    env.takeIdle();  // and dropped at once
    KJ_EXPECT(env.pool->getIdleCount() == 1 && env.pool->getOpenCount() == 1,
        env.pool->getIdleCount(), env.pool->getOpenCount());
  }
  env.checkCounted("after three dropped WebSocket attempts");
  KJ_EXPECT(s.dropped() == 0 && s.reuses == 0, s.dropped(), s.reuses);
  KJ_EXPECT(env.get("/b") == "0 /b");
  KJ_EXPECT(s.connectionsOpened == 1 && s.reuses == 1, s.connectionsOpened, s.reuses);
  KJ_EXPECT(env.upstream.seen.size() == 2, env.upstream.seen.size());
  env.checkCounted("after /b");
}

KJ_TEST("readopt: a connection taken from the idle chain by requests that give up keeps its "
    "idle clock, and expires idleTimeout after it last carried a request") {
  // Settings::idleTimeout: "An idle connection unused this long is closed." A request that takes
  // the idle connection and gives up before sending anything on it (here a WebSocket attempt,
  // dropped) does not use it: the connection goes back with the idle time it had. Otherwise
  // callers that cancel now and then (a proxy whose clients go away) would keep a connection
  // unused for many idleTimeouts, past the upstream's own keep-alive timeout, which is what
  // idleTimeout exists to stay under.
  auto settings = limits(1);
  settings.idleTimeout = 100 * kj::MILLISECONDS;
  Env env(settings);
  auto& s = env.pool->getStats();
  KJ_EXPECT(env.get("/a") == "0 /a");
  auto lastUsed = env.timer.now();
  for (int i = 0; i < 10; i++) {
    env.advance(90 * kj::MILLISECONDS);
    env.takeIdle();  // and dropped at once
  }
  env.advance(20 * kj::MILLISECONDS);
  auto unusedMs = (env.timer.now() - lastUsed) / kj::MILLISECONDS;
  KJ_EXPECT(s.droppedIdleTimeout == 1,
      "a connection unused for many times idleTimeout (100 ms) is still open", unusedMs,
      env.pool->getIdleCount(), s.droppedIdleTimeout);
  KJ_EXPECT(env.pool->getOpenCount() == 0);
  env.checkCounted("at the end");
}

KJ_TEST("readopt: three waiters whose waitTimeouts all fall due in the event the connection is "
    "handed over: it goes down the queue; every waiter fails OVERLOADED or is served, once") {
  // w0's timeout wins its exclusiveJoin (armed before the hand-over) and w0's connection is
  // readopted from within that event and handed to w1, whose hand-over (armed depth-first) then
  // beats w1's own timeout: w1 is served, w2 times out. Whatever the order, no request is sent
  // twice and the connection ends idle, counted.
  auto settings = limits(1);
  settings.waitTimeout = 50 * kj::MILLISECONDS;
  Env env(settings);
  auto& s = env.pool->getStats();
  auto a = env.bounded(env.start("/close-a"));
  kj::Vector<kj::Promise<kj::String>> waiting;
  for (int i = 0; i < 3; i++) waiting.add(textOf(env.start(kj::str("/w", i))));
  env.turns();
  KJ_ASSERT(env.pool->getWaitingCount() == 3);
  env.upstream.delayConnect = [&](kj::Promise<kj::Own<kj::AsyncIoStream>> stream) {
    return stream.then([&](kj::Own<kj::AsyncIoStream>&& st) {
      env.timer.advanceTo(env.timer.now() + 50 * kj::MILLISECONDS);
      return kj::mv(st);
    });
  };
  KJ_EXPECT(env.read(kj::mv(a)) == "0 /close-a");
  kj::Vector<kj::String> outcomes;
  for (auto& w: waiting) outcomes.add(env.bounded(kj::mv(w)));
  env.upstream.delayConnect = nullptr;
  env.turns();
  KJ_EXPECT(outcomes[0].startsWith("overloaded"), outcomes[0]);
  unsigned served = 0;
  for (int i = 0; i < 3; i++) {
    if (outcomes[i] == kj::str("1 /w", i)) {
      ++served;
    } else {
      KJ_EXPECT(outcomes[i].startsWith("overloaded"), i, outcomes[i]);
    }
  }
  KJ_EXPECT(env.upstream.seen.size() == 1 + served, env.upstream.seen.size(), served);
  KJ_EXPECT(s.overloaded == 3 - served && s.connectionsOpened == 2, s.overloaded,
      s.connectionsOpened);
  KJ_EXPECT(env.pool->getIdleCount() == 1 && s.dropped() == 1, env.pool->getIdleCount(),
      s.dropped());
  env.checkCounted("after the chain of timeouts");
  KJ_EXPECT(env.get("/c") == "1 /c");
  env.checkCounted("after /c");
}

KJ_TEST("readopt: the server closes the connection in the event it is handed to a waiter that "
    "gives up; the close is counted once, and the next request gets a new connection") {
  Env env(limits(1));
  auto& s = env.pool->getStats();
  auto a = env.bounded(env.start("/a"));
  kj::Maybe<kj::Promise<Response>> b = env.start("/b");
  env.turns();
  KJ_ASSERT(env.pool->getWaitingCount() == 1);
  KJ_EXPECT(readThen(env, a, [&]() {
    env.upstream.end(0);
    b = nullptr;
  }) == "0 /a");
  env.turns();
  KJ_EXPECT(s.droppedPeerClosedIdle == 1 && s.dropped() == 1, s.droppedPeerClosedIdle,
      s.dropped());
  KJ_EXPECT(env.pool->getOpenCount() == 0, env.pool->getOpenCount());
  env.checkCounted("after the close");
  KJ_EXPECT(env.get("/c") == "1 /c");
  env.checkCounted("after /c");
}

KJ_TEST("readopt: the server sends unsolicited bytes in the event the connection is handed to a "
    "waiter that gives up; the readopted connection is dropped as poisoned, never used") {
  for (int order = 0; order < 2; order++) {
    KJ_CONTEXT(order);
    Env env(limits(1));
    auto& s = env.pool->getStats();
    auto a = env.bounded(env.start("/a"));
    kj::Maybe<kj::Promise<Response>> b = env.start("/b");
    env.turns();
    KJ_ASSERT(env.pool->getWaitingCount() == 1);
    KJ_EXPECT(readThen(env, a, [&]() {
      if (order == 0) env.upstream.poke(0, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\npoison");
      b = nullptr;
      if (order == 1) env.upstream.poke(0, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\npoison");
    }) == "0 /a");
    env.turns();
    KJ_EXPECT(s.droppedUnsolicitedBytes == 1 && s.dropped() == 1, s.droppedUnsolicitedBytes,
        s.dropped());
    env.checkCounted("after the bytes");
    KJ_EXPECT(env.get("/c") == "1 /c");
    env.checkCounted("after /c");
  }
}

KJ_TEST("readopt: maxRequestsPerConnection counts the uses the connection had before it was "
    "readopted") {
  auto settings = limits(1);
  settings.maxRequestsPerConnection = 2;
  Env env(settings);
  auto& s = env.pool->getStats();
  KJ_EXPECT(env.get("/a") == "0 /a");
  env.takeIdle();  // and dropped at once
  KJ_EXPECT(env.pool->getIdleCount() == 1);
  KJ_EXPECT(env.get("/b") == "0 /b");
  env.turns();
  KJ_EXPECT(s.droppedMaxRequests == 1 && env.pool->getOpenCount() == 0, s.droppedMaxRequests,
      env.pool->getOpenCount());
  KJ_EXPECT(s.reuses == 1, s.reuses);
  env.checkCounted("after the second use");
  KJ_EXPECT(env.get("/c") == "1 /c");
  env.checkCounted("after /c");
}

KJ_TEST("readopt: with no idle connections allowed, a connection handed to a waiter that gives "
    "up is closed, counted as the idle limit") {
  auto settings = limits(1);
  settings.maxIdleConnections = 0;
  Env env(settings);
  auto& s = env.pool->getStats();
  auto a = env.bounded(env.start("/a"));
  kj::Maybe<kj::Promise<Response>> b = env.start("/b");
  env.turns();
  KJ_ASSERT(env.pool->getWaitingCount() == 1);
  KJ_EXPECT(readThen(env, a, [&]() { b = nullptr; }) == "0 /a");
  env.turns();
  KJ_EXPECT(s.droppedIdleLimit == 1 && env.pool->getOpenCount() == 0, s.droppedIdleLimit,
      env.pool->getOpenCount());
  KJ_EXPECT(env.upstream.seen.size() == 1, env.upstream.seen.size());
  env.checkCounted("after the readopt");
  KJ_EXPECT(env.get("/c") == "1 /c");
  env.checkCounted("after /c");
}

KJ_TEST("readopt: under neverReuse, a new connection handed to a waiter whose waitTimeout wins "
    "is closed and counted; the next request is served") {
  auto settings = limits(1);
  settings.neverReuse = true;
  settings.waitTimeout = 50 * kj::MILLISECONDS;
  Env env(settings);
  auto& s = env.pool->getStats();
  auto a = env.bounded(env.start("/a"));
  auto b = textOf(env.start("/b"));
  env.turns();
  KJ_ASSERT(env.pool->getWaitingCount() == 1);
  env.upstream.delayConnect = [&](kj::Promise<kj::Own<kj::AsyncIoStream>> stream) {
    return stream.then([&](kj::Own<kj::AsyncIoStream>&& st) {
      env.timer.advanceTo(env.timer.now() + 50 * kj::MILLISECONDS);
      return kj::mv(st);
    });
  };
  KJ_EXPECT(env.read(kj::mv(a)) == "0 /a");
  auto outcome = env.bounded(kj::mv(b));
  env.upstream.delayConnect = nullptr;
  env.turns();
  KJ_EXPECT(outcome.startsWith("overloaded"), outcome);
  KJ_EXPECT(s.droppedNeverReuse == 2, s.droppedNeverReuse);
  env.checkCounted("after the race");
  KJ_EXPECT(env.get("/c") == "2 /c");
  env.checkCounted("after /c");
}

KJ_TEST("readopt: a connector called from serveWaiters() drops a waiter that holds a handed-over "
    "connection; it goes to the next waiter, each request is served once, counts exact") {
  // In the hand-over event (A's connection handed to w0) the caller drops B's body early: B's
  // connection closes (abandoned), serveWaiters() opens one for w1, and the connector (called
  // from there) drops w0, whose connection is then readopted from within serveWaiters() and
  // goes to w2.
  Env env(limits(2));
  auto& s = env.pool->getStats();
  auto a = env.bounded(env.start("/a"));
  auto b = env.bounded(env.start("/b"));
  kj::Vector<kj::Maybe<kj::Promise<kj::String>>> waiting;
  for (int i = 0; i < 3; i++) waiting.add(textOf(env.start(kj::str("/w", i))));
  env.turns();
  KJ_ASSERT(env.pool->getWaitingCount() == 3);
  unsigned hooked = 0;
  env.upstream.inConnector = [&]() {
    if (hooked++ == 0) waiting[0] = nullptr;
  };
  KJ_EXPECT(readThen(env, a, [&]() { b.body = nullptr; }) == "0 /a");
  env.turns();
  env.upstream.inConnector = nullptr;
  KJ_EXPECT(hooked == 1, hooked);
  auto t1 = env.bounded(KJ_ASSERT_NONNULL(kj::mv(waiting[1])));
  auto t2 = env.bounded(KJ_ASSERT_NONNULL(kj::mv(waiting[2])));
  KJ_EXPECT(t1.endsWith(" /w1") && t2.endsWith(" /w2"), t1, t2);
  KJ_EXPECT(connectionOf(t1) != connectionOf(t2), t1, t2);
  KJ_EXPECT(env.upstream.seen.size() == 4, env.upstream.seen.size());
  KJ_EXPECT(s.droppedAbandoned == 1 && s.connectionsOpened == 3, s.droppedAbandoned,
      s.connectionsOpened);
  env.checkCounted("after the re-entrant readopt");
}

KJ_TEST("readopt: the pool destroyed in the hand-over event, before the waiter gives up; and "
    "with a readopted connection busy: nothing leaks, nothing is readopted into a dead pool") {
  {
    Env env(limits(1));
    auto a = env.bounded(env.start("/a"));
    kj::Maybe<kj::Promise<kj::String>> b = textOf(env.start("/b"));
    env.turns();
    KJ_EXPECT(readThen(env, a, [&]() {
      env.pool = nullptr;
      b = nullptr;
    }) == "0 /a");
    env.turns();
    KJ_EXPECT(env.upstream.open == 0, env.upstream.open);
  }
  {
    Env env(limits(1));
    auto a = env.bounded(env.start("/a"));
    auto b = textOf(env.start("/b"));
    env.turns();
    KJ_EXPECT(readThen(env, a, [&]() { env.pool = nullptr; }) == "0 /a");
    auto text = env.bounded(kj::mv(b));
    KJ_EXPECT(text.startsWith("failed: the ConnectionPool was destroyed"), text);
    env.turns();
    KJ_EXPECT(env.upstream.open == 0, env.upstream.open);
  }
  {
    Env env(limits(1));
    KJ_EXPECT(env.get("/a") == "0 /a");
    env.takeIdle();  // and dropped at once
    auto b = env.bounded(env.start("/b"));  // on the readopted connection
    env.pool = nullptr;
    KJ_EXPECT(env.read(kj::mv(b)) == "0 /b");
    env.turns();
    KJ_EXPECT(env.upstream.open == 0, env.upstream.open);
  }
}

KJ_TEST("readopt: a buffered-body request cancelled as soon as it took the idle connection "
    "(acquire() and sendLater() run in one event, so it was already started): abandoned, "
    "counted once, never readopted") {
  Env env(limits(1));
  auto& s = env.pool->getStats();
  KJ_EXPECT(env.get("/a") == "0 /a");
  kj::HttpHeaders headers(env.table);
  auto request = env.pool->request(kj::HttpMethod::POST, "/p", headers, uint64_t(3));
  kj::Maybe<kj::Promise<Response>> response = request.response.eagerlyEvaluate(nullptr);
  env.bounded(request.body->write("abc", 3));
  request.body = nullptr;
  for (int i = 0; i < 10 && env.pool->getIdleCount() == 1; i++) {
    kj::evalLater([]() {}).wait(env.ws);
  }
  KJ_EXPECT(env.pool->getIdleCount() == 0);
  response = nullptr;
  env.turns();
  KJ_EXPECT(s.droppedAbandoned == 1 && s.dropped() == 1, s.droppedAbandoned, s.dropped());
  env.checkCounted("after the cancelled POST");
  KJ_EXPECT(env.get("/c") == "1 /c");
  env.checkCounted("after /c");
}

KJ_TEST("readopt: two requests that each took an idle connection give up in the order they "
    "took them; each connection keeps its own idle time, and the older expires first") {
  // env.takeIdle() takes the newest idle connection; dropped before the event loop runs, it
  // sends nothing and the connection is readopted. The
  // older connection then comes back after a newer one: it must go before it in the idle chain,
  // with its own idle time, not the newer one's.
  auto settings = limits(2);
  settings.idleTimeout = 100 * kj::MILLISECONDS;
  Env env(settings);
  auto& s = env.pool->getStats();
  auto a = env.bounded(env.start("/a"));
  auto b = env.bounded(env.start("/b"));
  KJ_EXPECT(env.read(kj::mv(b)) == "1 /b");  // connection 1 idle since t0: its last use
  env.advance(50 * kj::MILLISECONDS);
  KJ_EXPECT(env.read(kj::mv(a)) == "0 /a");  // connection 0 idle since t0+50
  KJ_ASSERT(env.pool->getIdleCount() == 2);
  env.advance(10 * kj::MILLISECONDS);  // t0+60
  {
    auto first = env.takeIdle();   // takes connection 0 (the newest)
    auto second = env.takeIdle();  // takes connection 1
    KJ_ASSERT(env.pool->getIdleCount() == 0);
    { auto drop = kj::mv(first); }   // connection 0 back, idle since t0+50
    { auto drop = kj::mv(second); }  // connection 1 back, idle since t0, before connection 0
  }
  KJ_ASSERT(env.pool->getIdleCount() == 2);
  env.advance(50 * kj::MILLISECONDS);  // t0+110: connection 1 unused for 110 ms
  KJ_EXPECT(s.droppedIdleTimeout == 1,
      "connection 1, unused for 110 ms (idleTimeout 100 ms), is still open",
      s.droppedIdleTimeout, env.pool->getIdleCount());
  KJ_EXPECT(env.upstream.seen.size() == 2, env.upstream.seen.size());  // nothing else was sent
  KJ_EXPECT(env.get("/c") == "0 /c");  // connection 0 is left, and reused
  env.checkCounted("at the end");
}

KJ_TEST("readopt: a connection whose idle time ran out while it was handed out is closed, and "
    "the next waiting request gets a new one") {
  // The event loop may read the clock while a handed-over connection waits to be taken (it polls
  // every so many turns); here the timer moves in the hand-over's event. The connection, idle
  // since its last response, is past idleTimeout when the request it was handed to gives up:
  // it must not go on to the next waiter.
  auto settings = limits(1);
  settings.idleTimeout = 100 * kj::MILLISECONDS;
  Env env(settings);
  auto& s = env.pool->getStats();
  auto a = env.bounded(env.start("/a"));
  kj::Maybe<kj::Promise<Response>> w1 = env.start("/w1");
  auto w2 = textOf(env.start("/w2"));
  env.turns();
  KJ_ASSERT(env.pool->getWaitingCount() == 2);
  KJ_EXPECT(readThen(env, a, [&]() {
    env.timer.advanceTo(env.timer.now() + 150 * kj::MILLISECONDS);
    w1 = nullptr;
  }) == "0 /a");
  KJ_EXPECT(env.bounded(kj::mv(w2)) == "1 /w2");
  KJ_EXPECT(s.droppedIdleTimeout == 1 && s.connectionsOpened == 2, s.droppedIdleTimeout,
      s.connectionsOpened);
  KJ_EXPECT(env.upstream.seen.size() == 2, env.upstream.seen.size());  // /a and /w2 only
  env.checkCounted("at the end");
}

}  // namespace
}  // namespace sockfetch
