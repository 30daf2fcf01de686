// ConnectionPool's idle time: how long a connection has been idle (from when it was opened or
// last carried a request), kept when it is given back unused, the idle chain ordered by it in
// every order of return, the one sweep that closes the expired, an idleTimeout of 0, the pool
// destroyed while a taken connection is held, and timeouts that mean "never".
//
// In-process pipes and a kj::TimerImpl the test advances by hand (pipe-pool-env.h): the order of
// events is deterministic, nothing depends on wall time.

#include "pool.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/pipe-pool-env.h>

#include <kj/debug.h>
#include <kj/test.h>

#include <algorithm>

namespace sockfetch {
namespace {

using Response = kj::HttpClient::Response;
using Env = test::PipePoolEnv;
using test::connectionOf;
using test::limits;



KJ_TEST("idle time: connections given back unused in every order keep the chain ordered; the "
    "sweep closes exactly the expired ones, oldest first, and never a fresh one") {
  // Four connections idle at t0, t0+10, t0+20, t0+30; WebSocket attempts take them all (newest
  // first) and give them back in each of the 24 orders; then, step by step, exactly those
  // past idleTimeout are closed, and the survivors are reused newest first.
  unsigned order[4] = {0, 1, 2, 3};
  unsigned permutations = 0;
  do {
    ++permutations;
    KJ_CONTEXT(order[0], order[1], order[2], order[3]);
    auto settings = limits(4);
    settings.idleTimeout = 100 * kj::MILLISECONDS;
    Env env(settings);
    auto& s = env.pool->getStats();
    kj::Vector<Response> responses;
    for (int i = 0; i < 4; i++) responses.add(env.bounded(env.start(kj::str("/", i))));
    for (int i = 0; i < 4; i++) {
      if (i > 0) env.advance(10 * kj::MILLISECONDS);
      KJ_EXPECT(connectionOf(env.read(kj::mv(responses[i]))) == i);
    }
    kj::Maybe<kj::Promise<kj::HttpClient::WebSocketResponse>> held[4];
    for (int i = 3; i >= 0; i--) held[i] = env.takeIdle();  // each takes the newest: i
    KJ_ASSERT(env.pool->getIdleCount() == 0);
    for (auto i: order) held[i] = nullptr;
    env.turns();
    KJ_EXPECT(env.upstream.seen.size() == 4, env.upstream.seen.size());
    KJ_ASSERT(env.pool->getIdleCount() == 4);
    // Connection i expires at t0 + 100 + 10 i.
    env.advance(75 * kj::MILLISECONDS);  // t0+105: connection 0 gone
    KJ_EXPECT(s.droppedIdleTimeout == 1 && env.pool->getIdleCount() == 3, s.droppedIdleTimeout);
    env.advance(10 * kj::MILLISECONDS);  // t0+115: connection 1 gone
    KJ_EXPECT(s.droppedIdleTimeout == 2 && env.pool->getIdleCount() == 2, s.droppedIdleTimeout);
    auto x = env.bounded(env.start("/x"));
    auto y = env.bounded(env.start("/y"));
    KJ_EXPECT(env.read(kj::mv(x)) == "3 /x");
    KJ_EXPECT(env.read(kj::mv(y)) == "2 /y");
    KJ_EXPECT(s.connectionsOpened == 4 && s.dropped() == 2, s.connectionsOpened, s.dropped());
    env.checkCounted("at the end");
  } while (std::next_permutation(order, order + 4));
  KJ_EXPECT(permutations == 24);
}

KJ_TEST("idle time: idleTimeout 0 closes a connection given back unused, and one come back "
    "from a request at the next sweep; counts exact") {
  auto settings = limits(1);
  settings.idleTimeout = 0 * kj::MILLISECONDS;
  Env env(settings);
  auto& s = env.pool->getStats();
  KJ_EXPECT(env.get("/a") == "0 /a");
  env.advance(1 * kj::MILLISECONDS);
  KJ_EXPECT(env.pool->getOpenCount() == 0 && s.droppedIdleTimeout == 1);
  auto a = env.bounded(env.start("/b"));
  KJ_EXPECT(env.read(kj::mv(a)) == "1 /b");
  KJ_ASSERT(env.pool->getIdleCount() == 1);  // the sweep is due, not yet run
  env.takeIdle();  // and dropped at once
  KJ_EXPECT(env.pool->getOpenCount() == 0 && s.droppedIdleTimeout == 2, s.droppedIdleTimeout);
  env.checkCounted("at the end");
}

KJ_TEST("idle time: the pool destroyed while a connection taken from the idle chain is held "
    "unused; dropped or awaited afterwards it is not readopted, nothing leaks") {
  for (int awaited = 0; awaited < 2; awaited++) {
    KJ_CONTEXT(awaited);
    Env env(limits(2));
    KJ_EXPECT(env.get("/a") == "0 /a");
    kj::Maybe<kj::Promise<kj::HttpClient::WebSocketResponse>> held = env.takeIdle();
    env.pool = nullptr;
    if (awaited) {
      auto text = env.bounded(KJ_ASSERT_NONNULL(kj::mv(held)).then(
          [](kj::HttpClient::WebSocketResponse&&) { return kj::str("answered"); },
          [](kj::Exception&& e) { return kj::str("failed: ", e.getDescription()); }));
      KJ_EXPECT(text.startsWith("failed: "), text);
    } else {
      held = nullptr;
    }
    env.turns();
    KJ_EXPECT(env.upstream.open == 0, env.upstream.open);
    KJ_EXPECT(env.upstream.seen.size() == 1, env.upstream.seen.size());
  }
}

KJ_TEST("idle time: timeouts of kj::maxValue (\"never\") never fall due: an idle connection "
    "stays, a waiting request waits and is served, a connection opens") {
  // idleSince + idleTimeout, and the timer's own now + delay for the wait and connect timeouts,
  // would overflow (undefined behaviour; UBSan aborts on it): the pool cuts them to a century.
  auto settings = limits(1);
  settings.idleTimeout = kj::maxValue;
  settings.waitTimeout = kj::maxValue;
  settings.connectTimeout = kj::maxValue;
  Env env(settings);
  auto& s = env.pool->getStats();
  env.advance(1 * kj::MILLISECONDS);
  auto a = env.bounded(env.start("/a"));
  auto b = env.start("/b");
  env.turns();
  KJ_EXPECT(env.pool->getWaitingCount() == 1);
  env.advance(1000 * kj::SECONDS);
  KJ_EXPECT(env.read(kj::mv(a)) == "0 /a");
  KJ_EXPECT(env.read(env.bounded(kj::mv(b))) == "0 /b");
  env.advance(1000 * kj::SECONDS);
  KJ_EXPECT(env.pool->getIdleCount() == 1 && s.droppedIdleTimeout == 0 && s.overloaded == 0,
      env.pool->getIdleCount(), s.droppedIdleTimeout, s.overloaded);
  env.checkCounted("at the end");
}

}  // namespace
}  // namespace sockfetch
