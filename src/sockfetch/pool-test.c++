#include "pool.h"

#include <sockfetch/connector.h>
#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <string.h>

namespace sockfetch {
namespace {

using test::ok;
using test::ScriptedServer;
using Reply = ScriptedServer::Reply;

Reply echoPath(kj::StringPtr request) {
  // Answers with the request line's path.
  return ok(test::pathOf(request));
}

struct Env {
  // An event loop, a scripted upstream and a pool in front of it. Members in dependency order.
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::WaitScope& ws = io.waitScope;
  kj::Timer& timer = io.provider->getTimer();
  kj::HttpHeaderTable table;
  kj::Own<ScriptedServer> server;
  kj::Own<kj::NetworkAddress> address;
  kj::Own<ConnectionPool> pool;

  explicit Env(ScriptedServer::Handler handler, ConnectionPool::Settings settings = {},
      bool unix = false) {
    server = kj::heap<ScriptedServer>(io, unix ? "unix"_kj : "127.0.0.1"_kj, kj::mv(handler));
    address = server->address();
    pool = kj::heap<ConnectionPool>(timer, table, *address, kj::mv(settings));
  }

  kj::HttpHeaders headers() {
    kj::HttpHeaders h(table);
    h.set(kj::HttpHeaderId::HOST, "upstream.test");
    return h;
  }

  kj::Promise<kj::String> get(kj::StringPtr url) {
    auto request = pool->request(kj::HttpMethod::GET, url, headers());
    request.body = nullptr;
    return request.response.then([](kj::HttpClient::Response&& response) {
      return response.body->readAllText().attach(kj::mv(response.body));
    });
  }

  void settle() {
    // Lets deferred closes and the peer's reactions happen.
    timer.afterDelay(20 * kj::MILLISECONDS).wait(ws);
  }

  template <typename Func>
  void waitFor(Func&& condition) {
    auto deadline = timer.now() + 2 * kj::SECONDS;
    while (!condition() && timer.now() < deadline) {
      timer.afterDelay(1 * kj::MILLISECONDS).wait(ws);
    }
  }
};

// =================================================================================================
// Reuse and concurrency

void sequentialReuse(bool unix) {
  Env env([](unsigned, unsigned, kj::StringPtr request) { return echoPath(request); }, {}, unix);
  for (int i = 0; i < 20; i++) {
    KJ_EXPECT(env.get(kj::str("/seq/", i)).wait(env.ws) == kj::str("/seq/", i));
  }
  auto& stats = env.pool->getStats();
  KJ_EXPECT(env.server->accepted == 1);
  KJ_EXPECT(stats.connectionsOpened == 1);
  KJ_EXPECT(stats.requests == 20);
  KJ_EXPECT(stats.reuses == 19);
  KJ_EXPECT(env.pool->getIdleCount() == 1);
}

KJ_TEST("ConnectionPool reuses one connection for sequential requests (tcp)") {
  sequentialReuse(false);
}

KJ_TEST("ConnectionPool reuses one connection for sequential requests (unix socket)") {
  sequentialReuse(true);
}

KJ_TEST("ConnectionPool never pipelines: 40 parallel requests over at most 4 connections") {
  ConnectionPool::Settings settings;
  settings.maxConnections = 4;
  Env env([](unsigned, unsigned, kj::StringPtr request) {
    auto reply = echoPath(request);
    reply.delay = 2 * kj::MILLISECONDS;
    return reply;
  }, kj::mv(settings));
  kj::Vector<kj::Promise<kj::String>> responses;
  for (int i = 0; i < 40; i++) responses.add(env.get(kj::str("/p/", i)));
  auto texts = kj::joinPromises(responses.releaseAsArray()).wait(env.ws);
  for (int i = 0; i < 40; i++) KJ_EXPECT(texts[i] == kj::str("/p/", i));
  KJ_EXPECT(env.server->pipelined == 0, "a connection carried two requests at once");
  KJ_EXPECT(env.server->accepted <= 4, env.server->accepted);
  KJ_EXPECT(env.server->maxBusy <= 4);
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.waits > 0);
  KJ_EXPECT(stats.reuses >= 36, stats.reuses);
  KJ_EXPECT(env.pool->getOpenCount() <= 4);
}

KJ_TEST("ConnectionPool never pipelines with many connections and parallel bursts") {
  Env env([](unsigned, unsigned request, kj::StringPtr text) {
    auto reply = echoPath(text);
    reply.delay = (request % 3) * kj::MILLISECONDS;
    return reply;
  });
  for (int round = 0; round < 5; round++) {
    kj::Vector<kj::Promise<kj::String>> responses;
    for (int i = 0; i < 30; i++) responses.add(env.get(kj::str("/r", round, "/", i)));
    auto texts = kj::joinPromises(responses.releaseAsArray()).wait(env.ws);
    for (int i = 0; i < 30; i++) KJ_EXPECT(texts[i] == kj::str("/r", round, "/", i));
  }
  KJ_EXPECT(env.server->pipelined == 0);
  KJ_EXPECT(env.pool->getStats().reuses >= 120, env.pool->getStats().reuses);
}

// =================================================================================================
// The stale keep-alive race

Reply closeOnSecond(unsigned connection, unsigned request, kj::StringPtr text) {
  // The first connection answers once, then takes the next request and closes without a word.
  if (connection == 0 && request == 1) {
    Reply reply;
    reply.closeAfter = true;
    return reply;
  }
  return echoPath(text);
}

KJ_TEST("ConnectionPool retries a GET that hit a stale connection, once, on a new connection") {
  Env env(closeOnSecond);
  KJ_EXPECT(env.get("/one").wait(env.ws) == "/one");
  KJ_EXPECT(env.get("/two").wait(env.ws) == "/two");
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.retries == 1);
  KJ_EXPECT(stats.connectionsOpened == 2);
  KJ_EXPECT(env.server->accepted == 2);
  KJ_EXPECT(stats.droppedStale == 1);
  KJ_EXPECT(stats.droppedFailed == 0);
}

KJ_TEST("ConnectionPool closes a connection that comes back to make room for a retry") {
  // Two connections, both busy, one request waiting: the request that hits a stale connection
  // must retry on a new one, and gets it when the other connection comes back (which is closed
  // for it, not reused). Each close is counted under its own reason.
  ConnectionPool::Settings settings;
  settings.maxConnections = 2;
  Env env([](unsigned, unsigned request, kj::StringPtr text) {
    if (text.startsWith("GET /stale ") && request > 0) {
      Reply reply;
      reply.closeAfter = true;  // the keep-alive race: closed without a word
      return reply;
    }
    auto reply = echoPath(text);
    if (text.startsWith("GET /slow ")) reply.delay = 50 * kj::MILLISECONDS;
    return reply;
  }, kj::mv(settings));
  {
    auto a = env.get("/a");
    auto b = env.get("/b");
    KJ_EXPECT(a.wait(env.ws) == "/a");
    KJ_EXPECT(b.wait(env.ws) == "/b");
  }
  KJ_ASSERT(env.pool->getIdleCount() == 2);
  auto slow = env.get("/slow");
  auto stale = env.get("/stale");
  auto waiting = env.get("/waiting");
  KJ_EXPECT(stale.wait(env.ws) == "/stale");
  KJ_EXPECT(slow.wait(env.ws) == "/slow");
  KJ_EXPECT(waiting.wait(env.ws) == "/waiting");
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.retries == 1);
  KJ_EXPECT(stats.droppedStale == 1);
  KJ_EXPECT(stats.droppedForRetry == 1, stats.droppedForRetry);
  KJ_EXPECT(stats.droppedFailed == 0);
  KJ_EXPECT(stats.droppedIdleLimit == 0);
  KJ_EXPECT(stats.connectionsOpened == 4, stats.connectionsOpened);
  KJ_EXPECT(env.server->pipelined == 0);
}

KJ_TEST("ConnectionPool does not retry a GET that fails on a new connection before any response") {
  // Only a reused connection can be stale: one that fails on its first request does so because
  // of the server, and sending the request again would just repeat that.
  Env env([](unsigned, unsigned, kj::StringPtr) {
    Reply reply;
    reply.closeAfter = true;  // reads the request, closes without a word
    return reply;
  });
  KJ_EXPECT_THROW(DISCONNECTED, env.get("/once").wait(env.ws));
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.retries == 0, stats.retries);
  KJ_EXPECT(env.server->accepted == 1, env.server->accepted);
  KJ_EXPECT(stats.droppedFailed == 1, stats.droppedFailed);
  KJ_EXPECT(stats.droppedStale == 0);
}

KJ_TEST("ConnectionPool retries a WebSocket handshake that hit a stale connection") {
  Env env([](unsigned connection, unsigned request, kj::StringPtr text) {
    if (connection == 0 && request == 1) {
      Reply reply;
      reply.closeAfter = true;  // stale: closes without a word
      return reply;
    }
    if (connection == 1) {
      Reply reply;
      reply.bytes = kj::str("HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno");
      return reply;
    }
    return echoPath(text);
  });
  KJ_EXPECT(env.get("/one").wait(env.ws) == "/one");
  auto response = env.pool->openWebSocket("/ws", env.headers()).wait(env.ws);
  KJ_EXPECT(response.statusCode == 403);
  auto& body = KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>());
  KJ_EXPECT(body->readAllText().wait(env.ws) == "no");
  KJ_EXPECT(env.pool->getStats().retries == 1);
  KJ_EXPECT(env.server->accepted == 2);
}

kj::Promise<kj::String> getWithOwnHeaders(Env& env, kj::StringPtr url,
    kj::StringPtr longValue = nullptr) {
  // A GET whose headers (indexed, unindexed, repeated, empty, and `longValue` as X-Long if
  // given) are gone once request() returns.
  kj::HttpHeaders headers(env.table);
  headers.set(kj::HttpHeaderId::HOST, "upstream.test");
  headers.add("X-Trace", kj::str("trace ", url));
  headers.add("X-Dup", "1");
  headers.add("X-Dup", "2");
  headers.add("X-Empty", "");
  if (longValue != nullptr) headers.add("X-Long", longValue);
  auto request = env.pool->request(kj::HttpMethod::GET, kj::str(url, "?q=a%20b"), headers);
  request.body = nullptr;
  return request.response.then([](kj::HttpClient::Response&& response) {
    return response.body->readAllText().attach(kj::mv(response.body));
  });
}

constexpr kj::StringPtr OWN_HEADERS = "Host: upstream.test\r\nX-Trace: trace /x\r\nX-Dup: 1\r\n"
    "X-Dup: 2\r\nX-Empty: \r\n\r\n"_kj;

KJ_TEST("ConnectionPool sends a retried request with the caller's exact url and headers") {
  // Short headers and long ones (the pool keeps its copy of a request inline up to a size, on
  // the heap beyond it).
  auto longValue = kj::str(kj::repeat('l', 700));
  for (kj::StringPtr extra: {kj::StringPtr(nullptr), longValue.asPtr()}) {
    KJ_CONTEXT(extra.size());
    kj::Vector<kj::String> seen;
    Env env([&seen](unsigned connection, unsigned request, kj::StringPtr text) {
      seen.add(kj::str(text));
      return closeOnSecond(connection, request, text);
    });
    KJ_EXPECT(env.get("/one").wait(env.ws) == "/one");
    KJ_EXPECT(getWithOwnHeaders(env, "/x", extra).wait(env.ws) == "/x?q=a%20b");
    KJ_EXPECT(env.pool->getStats().retries == 1);
    KJ_ASSERT(seen.size() == 3);
    auto headers = extra == nullptr ? kj::str(OWN_HEADERS)
        : kj::str(OWN_HEADERS.slice(0, OWN_HEADERS.size() - 2), "X-Long: ", extra, "\r\n\r\n");
    auto expected = kj::str("GET /x?q=a%20b HTTP/1.1\r\n", headers);
    KJ_EXPECT(seen[1] == expected, seen[1]);
    KJ_EXPECT(seen[2] == expected, seen[2]);
  }
}

KJ_TEST("ConnectionPool sends a request that waited with the caller's exact url and headers") {
  kj::Vector<kj::String> seen;
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  Env env([&seen](unsigned, unsigned, kj::StringPtr text) {
    seen.add(kj::str(text));
    auto reply = echoPath(text);
    reply.delay = 5 * kj::MILLISECONDS;
    return reply;
  }, kj::mv(settings));
  auto first = env.get("/first");
  auto second = getWithOwnHeaders(env, "/x");
  KJ_EXPECT(first.wait(env.ws) == "/first");
  KJ_EXPECT(second.wait(env.ws) == "/x?q=a%20b");
  KJ_EXPECT(env.pool->getStats().waits == 1);
  KJ_ASSERT(seen.size() == 2);
  KJ_EXPECT(seen[1] == kj::str("GET /x?q=a%20b HTTP/1.1\r\n", OWN_HEADERS), seen[1]);
}

struct OtherTableEnv {
  // A pool whose header table registers X-Dup and X-Empty, and a caller whose table does not
  // (a proxy passing on headers parsed with its server's table, say).
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::WaitScope& ws = io.waitScope;
  kj::Own<kj::HttpHeaderTable> poolTable;
  kj::HttpHeaderTable callerTable;
  kj::Vector<kj::String> seen;
  kj::Own<ScriptedServer> server;
  kj::Own<kj::NetworkAddress> address;
  kj::Own<ConnectionPool> pool;

  OtherTableEnv() {
    kj::HttpHeaderTable::Builder builder;
    builder.add("X-Dup");
    builder.add("X-Empty");
    poolTable = builder.build();
    server = kj::heap<ScriptedServer>(io, "127.0.0.1"_kj,
        [this](unsigned, unsigned, kj::StringPtr text) {
      seen.add(kj::str(text));
      return ok("no");
    });
    address = server->address();
    pool = kj::heap<ConnectionPool>(io.provider->getTimer(), *poolTable, *address);
  }

  kj::HttpHeaders callerHeaders() {
    kj::HttpHeaders h(callerTable);
    h.set(kj::HttpHeaderId::HOST, "upstream.test");
    h.add("X-Dup", "1");
    h.add("X-Dup", "2");
    h.add("X-Empty", "");
    h.add("X-Last", "z");
    return h;
  }
};

constexpr kj::StringPtr CALLER_HEADERS =
    "Host: upstream.test\r\nX-Dup: 1\r\nX-Dup: 2\r\nX-Empty: \r\nX-Last: z\r\n"_kj;

KJ_TEST("ConnectionPool sends the caller's headers as they are, whatever table they use") {
  OtherTableEnv env;
  {
    auto request = env.pool->request(kj::HttpMethod::GET, "/new", env.callerHeaders());
    request.body = nullptr;
    auto response = request.response.wait(env.ws);  // on a new connection: sent from the copy
    KJ_EXPECT(response.body->readAllText().wait(env.ws) == "no");
  }
  auto response = env.pool->openWebSocket("/ws", env.callerHeaders()).wait(env.ws);
  auto& body = KJ_ASSERT_NONNULL(response.webSocketOrBody.tryGet<kj::Own<kj::AsyncInputStream>>());
  KJ_EXPECT(body->readAllText().wait(env.ws) == "no");
  KJ_ASSERT(env.seen.size() == 2);
  KJ_EXPECT(env.seen[0] == kj::str("GET /new HTTP/1.1\r\n", CALLER_HEADERS, "\r\n"), env.seen[0]);
  KJ_EXPECT(strstr(env.seen[1].cStr(), CALLER_HEADERS.cStr()) != nullptr, env.seen[1]);
}

KJ_TEST("ConnectionPool does not retry a POST that hit a stale connection") {
  Env env(closeOnSecond);
  KJ_EXPECT(env.get("/one").wait(env.ws) == "/one");
  auto request = env.pool->request(kj::HttpMethod::POST, "/post", env.headers(), uint64_t(4));
  auto write = writeAll(*request.body, "data"_kj.asBytes());
  write.wait(env.ws);
  request.body = nullptr;
  KJ_EXPECT_THROW(DISCONNECTED, request.response.wait(env.ws));
  KJ_EXPECT(env.pool->getStats().retries == 0);
  KJ_EXPECT(env.server->accepted == 1);
}

KJ_TEST("ConnectionPool retries a replayable PUT body on a stale connection") {
  Env env(closeOnSecond);
  KJ_EXPECT(env.get("/one").wait(env.ws) == "/one");
  auto request = env.pool->request(kj::HttpMethod::PUT, "/put", env.headers(), uint64_t(4));
  writeAll(*request.body, "data"_kj.asBytes()).wait(env.ws);
  request.body = nullptr;
  auto response = request.response.wait(env.ws);
  KJ_EXPECT(response.body->readAllText().wait(env.ws) == "/put");
  KJ_EXPECT(env.pool->getStats().retries == 1);
}

// =================================================================================================
// Drop reasons

KJ_TEST("ConnectionPool counts Connection: close, HTTP/1.0, malformed and abandoned drops") {
  Env env([](unsigned, unsigned, kj::StringPtr text) {
    if (text.startsWith("GET /close ")) return ok("bye", "Connection: close\r\n");
    if (text.startsWith("GET /old ")) {
      Reply reply;
      reply.bytes = kj::str("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold");
      return reply;
    }
    if (text.startsWith("GET /bad ")) {
      Reply reply;
      reply.bytes = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
      return reply;
    }
    return ok("0123456789");
  });
  KJ_EXPECT(env.get("/close").wait(env.ws) == "bye");
  KJ_EXPECT(env.get("/old").wait(env.ws) == "old");
  KJ_EXPECT_THROW_MESSAGE("chunk", env.get("/bad").wait(env.ws));
  {
    auto request = env.pool->request(kj::HttpMethod::GET, "/abandon", env.headers());
    request.body = nullptr;
    auto response = request.response.wait(env.ws);
    char c;
    response.body->tryRead(&c, 1, 1).wait(env.ws);
  }  // body dropped after one byte
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.droppedConnectionClose == 1);
  KJ_EXPECT(stats.droppedNotReusable == 1);
  KJ_EXPECT(stats.droppedFailed == 1);
  KJ_EXPECT(stats.droppedAbandoned == 1);
  KJ_EXPECT(env.pool->getIdleCount() == 0);
  env.waitFor([&]() { return env.server->open == 0; });
  KJ_EXPECT(env.server->open == 0, "dropped connections were not closed");
}

KJ_TEST("ConnectionPool drops an idle connection the server sends unsolicited bytes on") {
  Env env([](unsigned, unsigned, kj::StringPtr text) {
    auto reply = echoPath(text);
    reply.thenUnsolicited = kj::str("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON");
    return reply;
  });
  KJ_EXPECT(env.get("/a").wait(env.ws) == "/a");
  env.waitFor([&]() { return env.pool->getStats().droppedUnsolicitedBytes == 1; });
  KJ_EXPECT(env.pool->getStats().droppedUnsolicitedBytes == 1);
  KJ_EXPECT(env.pool->getIdleCount() == 0);
  // The next request gets a new connection and the real answer, never the poison.
  KJ_EXPECT(env.get("/b").wait(env.ws) == "/b");
  KJ_EXPECT(env.server->accepted == 2);
}

KJ_TEST("ConnectionPool drops an idle connection the server closed") {
  Env env([](unsigned, unsigned, kj::StringPtr text) { return echoPath(text); });
  KJ_EXPECT(env.get("/a").wait(env.ws) == "/a");
  env.settle();
  env.server->closeIdleConnections();
  env.waitFor([&]() { return env.pool->getStats().droppedPeerClosedIdle == 1; });
  KJ_EXPECT(env.pool->getStats().droppedPeerClosedIdle == 1);
  KJ_EXPECT(env.pool->getIdleCount() == 0);
  KJ_EXPECT(env.get("/b").wait(env.ws) == "/b");
  KJ_EXPECT(env.pool->getStats().retries == 0);
}

KJ_TEST("ConnectionPool closes connections idle longer than idleTimeout") {
  ConnectionPool::Settings settings;
  settings.idleTimeout = 30 * kj::MILLISECONDS;
  Env env([](unsigned, unsigned, kj::StringPtr text) { return echoPath(text); },
      kj::mv(settings));
  KJ_EXPECT(env.get("/a").wait(env.ws) == "/a");
  KJ_EXPECT(env.pool->getIdleCount() == 1);
  env.waitFor([&]() { return env.server->open == 0; });
  KJ_EXPECT(env.pool->getStats().droppedIdleTimeout == 1);
  KJ_EXPECT(env.pool->getIdleCount() == 0);
  KJ_EXPECT(env.server->open == 0, "the timed-out connection was not closed");
}

KJ_TEST("ConnectionPool honours maxRequestsPerConnection, neverReuse and maxIdleConnections") {
  {
    ConnectionPool::Settings settings;
    settings.maxRequestsPerConnection = 2;
    Env env([](unsigned, unsigned, kj::StringPtr text) { return echoPath(text); },
        kj::mv(settings));
    for (int i = 0; i < 4; i++) KJ_EXPECT(env.get("/x").wait(env.ws) == "/x");
    KJ_EXPECT(env.pool->getStats().droppedMaxRequests == 2);
    KJ_EXPECT(env.server->accepted == 2);
  }
  {
    ConnectionPool::Settings settings;
    settings.neverReuse = true;
    Env env([](unsigned, unsigned, kj::StringPtr text) { return echoPath(text); },
        kj::mv(settings));
    for (int i = 0; i < 3; i++) KJ_EXPECT(env.get("/y").wait(env.ws) == "/y");
    KJ_EXPECT(env.pool->getStats().droppedNeverReuse == 3);
    KJ_EXPECT(env.pool->getStats().reuses == 0);
    KJ_EXPECT(env.server->accepted == 3);
  }
  {
    ConnectionPool::Settings settings;
    settings.maxIdleConnections = 1;
    Env env([](unsigned, unsigned, kj::StringPtr text) {
      auto reply = echoPath(text);
      reply.delay = 5 * kj::MILLISECONDS;
      return reply;
    }, kj::mv(settings));
    kj::Vector<kj::Promise<kj::String>> responses;
    for (int i = 0; i < 3; i++) responses.add(env.get("/z"));
    kj::joinPromises(responses.releaseAsArray()).wait(env.ws);
    KJ_EXPECT(env.pool->getStats().droppedIdleLimit == 2);
    KJ_EXPECT(env.pool->getIdleCount() == 1);
  }
}

// =================================================================================================
// Saturation

KJ_TEST("ConnectionPool fails with OVERLOADED past its wait queue") {
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  settings.maxWaiting = 1;
  Env env([](unsigned, unsigned, kj::StringPtr text) {
    auto reply = echoPath(text);
    reply.delay = 50 * kj::MILLISECONDS;
    return reply;
  }, kj::mv(settings));
  auto first = env.get("/1");
  auto second = env.get("/2");
  auto third = env.get("/3");
  KJ_EXPECT_THROW(OVERLOADED, third.wait(env.ws));
  KJ_EXPECT(first.wait(env.ws) == "/1");
  KJ_EXPECT(second.wait(env.ws) == "/2");
  auto& stats = env.pool->getStats();
  KJ_EXPECT(stats.overloaded == 1);
  KJ_EXPECT(stats.waits == 1);
  KJ_EXPECT(env.server->accepted == 1);
  KJ_EXPECT_THROW_MESSAGE("saturated", env.get("/4").exclusiveJoin(env.get("/5"))
      .exclusiveJoin(env.get("/6")).wait(env.ws));
}

KJ_TEST("ConnectionPool fails with OVERLOADED after waitTimeout") {
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  settings.waitTimeout = 30 * kj::MILLISECONDS;
  Env env([](unsigned, unsigned, kj::StringPtr text) {
    auto reply = echoPath(text);
    reply.delay = 300 * kj::MILLISECONDS;
    return reply;
  }, kj::mv(settings));
  auto first = env.get("/1");
  auto second = env.get("/2");
  KJ_EXPECT_THROW_MESSAGE("waited 30 ms for a free connection", second.wait(env.ws));
  KJ_EXPECT(first.wait(env.ws) == "/1");
  KJ_EXPECT(env.pool->getStats().overloaded == 1);
}

KJ_TEST("ConnectionPool reports a connection that cannot be opened") {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  // A port that was just listening and is now closed.
  auto& network = io.provider->getNetwork();
  kj::uint port;
  {
    auto listener = network.parseAddress("127.0.0.1", 0).wait(io.waitScope)->listen();
    port = listener->getPort();
  }
  auto address = network.parseAddress("127.0.0.1", port).wait(io.waitScope);
  ConnectionPool pool(io.provider->getTimer(), table, *address);
  kj::HttpHeaders headers(table);
  auto request = pool.request(kj::HttpMethod::GET, "/", headers);
  request.body = nullptr;
  KJ_EXPECT_THROW(DISCONNECTED, request.response.wait(io.waitScope));
  KJ_EXPECT(pool.getStats().connectFailures == 1);
  KJ_EXPECT(pool.getOpenCount() == 0);
}

KJ_TEST("ConnectionPool gives up on a connection that takes longer than connectTimeout") {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  ConnectionPool::Settings settings;
  settings.connectTimeout = 20 * kj::MILLISECONDS;
  unsigned attempts = 0;
  ConnectionPool pool(io.provider->getTimer(), table, [&attempts]() {
    ++attempts;
    return kj::Promise<kj::Own<kj::AsyncIoStream>>(kj::NEVER_DONE);
  }, kj::mv(settings));
  kj::HttpHeaders headers(table);
  auto request = pool.request(kj::HttpMethod::GET, "/", headers);
  request.body = nullptr;
  KJ_EXPECT_THROW_MESSAGE("timed out after 20 ms", request.response.wait(io.waitScope));
  KJ_EXPECT(attempts == 1);
  KJ_EXPECT(pool.getStats().connectFailures == 1);
  KJ_EXPECT(pool.getOpenCount() == 0);
}

KJ_TEST("ConnectionPool serves the next waiter when one gives up while its connection opens") {
  // One connection at most, opened slowly. A's response closes its connection, so a new one is
  // opened for B; B gives up meanwhile. C, waiting behind B, must get that connection.
  kj::AsyncIoContext io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  kj::HttpHeaderTable table;
  ScriptedServer server(io, "127.0.0.1", [](unsigned, unsigned, kj::StringPtr text) {
    return ok("done", "Connection: close\r\n");
  });
  auto address = server.address();
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  ConnectionPool pool(timer, table, [&]() {
    return timer.afterDelay(30 * kj::MILLISECONDS).then([&]() { return address->connect(); });
  }, kj::mv(settings));
  kj::HttpHeaders headers(table);
  headers.set(kj::HttpHeaderId::HOST, "upstream.test");
  auto a = pool.request(kj::HttpMethod::GET, "/a", headers);
  auto b = pool.request(kj::HttpMethod::GET, "/b", headers);
  auto c = pool.request(kj::HttpMethod::GET, "/c", headers);
  a.body = nullptr;
  b.body = nullptr;
  c.body = nullptr;
  auto bResponse = b.response.eagerlyEvaluate(nullptr);
  auto cBody = c.response.then([](kj::HttpClient::Response&& response) {
    return response.body->readAllText().attach(kj::mv(response.body));
  }).eagerlyEvaluate(nullptr);
  auto aResponse = a.response.wait(io.waitScope);
  KJ_EXPECT(aResponse.body->readAllText().wait(io.waitScope) == "done");  // B's connect starts
  bResponse = nullptr;                                                      // B gives up
  auto cDone = cBody.exclusiveJoin(timer.afterDelay(2 * kj::SECONDS).then([]() -> kj::String {
    KJ_FAIL_ASSERT("the request waiting behind a cancelled one was never served");
  }));
  KJ_EXPECT(cDone.wait(io.waitScope) == "done");
  KJ_EXPECT(pool.getStats().connectionsOpened == 2);
}

KJ_TEST("ConnectionPool survives a connector that throws instead of failing its promise") {
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  unsigned calls = 0;
  Env env([](unsigned, unsigned, kj::StringPtr) {
    auto reply = ok("done", "Connection: close\r\n");
    reply.delay = 10 * kj::MILLISECONDS;
    return reply;
  });
  ConnectionPool pool(env.timer, env.table, [&]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    if (calls++ > 0) KJ_FAIL_REQUIRE("no more connections today");
    return env.address->connect();
  }, kj::mv(settings));
  auto first = pool.request(kj::HttpMethod::GET, "/1", env.headers());
  auto second = pool.request(kj::HttpMethod::GET, "/2", env.headers());  // waits
  first.body = nullptr;
  second.body = nullptr;
  auto response = first.response.wait(env.ws);
  // Its end frees the only slot: the waiter's connect throws, from inside the pool's callback.
  KJ_EXPECT(response.body->readAllText().wait(env.ws) == "done");
  KJ_EXPECT_THROW_MESSAGE("no more connections today", second.response.wait(env.ws));
  KJ_EXPECT(pool.getStats().connectFailures == 1);
  KJ_EXPECT(pool.getOpenCount() == 0);
}

KJ_TEST("ConnectionPool accepts empty writes to a buffered request body") {
  Env env([](unsigned, unsigned, kj::StringPtr text) {
    return ok(text.endsWith("hello") ? "got hello" : "got nothing");
  });
  {
    auto request = env.pool->request(kj::HttpMethod::PUT, "/", env.headers(), uint64_t(5));
    request.body->write("", 0).wait(env.ws);
    request.body->write("hello", 5).wait(env.ws);
    request.body->write("", 0).wait(env.ws);  // after the body is complete
    auto response = request.response.wait(env.ws);
    KJ_EXPECT(response.body->readAllText().wait(env.ws) == "got hello");
  }
  {
    auto request = env.pool->request(kj::HttpMethod::POST, "/", env.headers(), uint64_t(0));
    request.body->write("", 0).wait(env.ws);
    request.body = nullptr;
    auto response = request.response.wait(env.ws);
    KJ_EXPECT(response.body->readAllText().wait(env.ws) == "got nothing");
  }
}

KJ_TEST("ConnectionPool: a streaming body written before the response is awaited") {
  // The body's writes wait for a connection: the request must go out without the response being
  // awaited, and when no connection can be had the write must fail rather than wait forever.
  Env env([](unsigned, unsigned, kj::StringPtr text) {
    return ok(strstr(text.cStr(), "hello") != nullptr ? "got it" : "no body?");
  });
  {
    auto request = env.pool->request(kj::HttpMethod::POST, "/", env.headers());  // chunked
    auto write = request.body->write("hello", 5);
    write.exclusiveJoin(env.timer.afterDelay(2 * kj::SECONDS).then([]() {
      KJ_FAIL_ASSERT("the body write waited forever for a connection");
    })).wait(env.ws);
    request.body = nullptr;
    auto response = request.response.wait(env.ws);
    KJ_EXPECT(response.body->readAllText().wait(env.ws) == "got it");
  }
  ConnectionPool unreachable(env.timer, env.table,
      []() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    return KJ_EXCEPTION(DISCONNECTED, "connection refused (test)");
  });
  auto request = unreachable.request(kj::HttpMethod::POST, "/", env.headers());
  KJ_EXPECT_THROW_MESSAGE("connection refused (test)", request.body->write("hello", 5)
      .exclusiveJoin(env.timer.afterDelay(2 * kj::SECONDS).then([]() {
    KJ_FAIL_ASSERT("the body write waited forever for a connection");
  })).wait(env.ws));
  KJ_EXPECT_THROW_MESSAGE("connection refused (test)", request.body->write("again", 5)
      .wait(env.ws));
  request.body = nullptr;
  KJ_EXPECT_THROW_MESSAGE("connection refused (test)", request.response.wait(env.ws));
}

// =================================================================================================
// CONNECT tunnels

KJ_TEST("ConnectionPool speaks HTTP through a CONNECT tunnel") {
  kj::Vector<kj::String> seen;
  Env env([&seen](unsigned, unsigned request, kj::StringPtr text) {
    seen.add(kj::heapString(text));
    if (request == 0) {
      Reply reply;
      reply.bytes = kj::str("HTTP/1.1 200 Connection Established\r\n\r\n");
      return reply;
    }
    return echoPath(text);  // the proxy's far end: the origin itself
  });
  auto proxy = env.server->address();
  ConnectionPool tunnelled(env.timer, env.table,
      tunnelConnector(addressConnector(*proxy), "origin.test:8080"));
  for (int i = 0; i < 3; i++) {
    auto request = tunnelled.request(kj::HttpMethod::GET, kj::str("/t/", i), env.headers());
    request.body = nullptr;
    auto response = request.response.wait(env.ws);
    KJ_EXPECT(response.body->readAllText().wait(env.ws) == kj::str("/t/", i));
  }
  KJ_ASSERT(seen.size() == 4);
  KJ_EXPECT(seen[0].startsWith("CONNECT origin.test:8080 HTTP/1.1\r\n"), seen[0]);
  KJ_EXPECT(seen[1].startsWith("GET /t/0 HTTP/1.1\r\n"), seen[1]);
  KJ_EXPECT(env.server->accepted == 1);
  KJ_EXPECT(tunnelled.getStats().reuses == 2);
}

KJ_TEST("ConnectionPool reports a proxy that refuses CONNECT, naming its status") {
  Env env([](unsigned, unsigned, kj::StringPtr) {
    Reply reply;
    reply.bytes = kj::str("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
    return reply;
  });
  auto proxy = env.server->address();
  ConnectionPool tunnelled(env.timer, env.table,
      tunnelConnector(addressConnector(*proxy), "blocked.test:443"));
  auto request = tunnelled.request(kj::HttpMethod::GET, "/", env.headers());
  request.body = nullptr;
  KJ_EXPECT_THROW_MESSAGE("refused to open a tunnel to blocked.test:443: \"403 Forbidden\"",
      request.response.wait(env.ws));
  KJ_EXPECT(tunnelled.getStats().connectFailures == 1);
}

KJ_TEST("ConnectionPool never takes bytes that follow the proxy's CONNECT answer as a response") {
  // The far end speaks before any request: what it sent is unsolicited, not the next response.
  unsigned requestsThroughTunnel = 0;
  Env env([&](unsigned, unsigned request, kj::StringPtr text) {
    if (request == 0) {
      Reply reply;
      reply.bytes = kj::str("HTTP/1.1 200 Connection Established\r\n\r\n"
          "XHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil");
      return reply;
    }
    ++requestsThroughTunnel;
    return ok("good");
  });
  auto proxy = env.server->address();
  ConnectionPool tunnelled(env.timer, env.table,
      tunnelConnector(addressConnector(*proxy), "origin.test:8080"));
  auto request = tunnelled.request(kj::HttpMethod::GET, "/", env.headers());
  request.body = nullptr;
  // The error names what came and says to check the address, not to send again.
  KJ_EXPECT_THROW_MESSAGE("(it began with \"X\"), which an HTTP/1.1 server never does; check "
      "that the upstream address is an HTTP server", request.response.wait(env.ws));
  // Nothing was written, so the pool tried once more on a new tunnel, which did the same.
  KJ_EXPECT(tunnelled.getStats().retries == 1);
  KJ_EXPECT(tunnelled.getStats().droppedUnsolicitedBytes == 2);
  KJ_EXPECT(requestsThroughTunnel == 0, "a request was written after the unsolicited bytes");
}

// =================================================================================================
// Destruction

KJ_TEST("ConnectionPool destroyed mid-flight fails waiters and lets the request in flight finish") {
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  Env env([](unsigned, unsigned, kj::StringPtr text) {
    auto reply = echoPath(text);
    reply.delay = 20 * kj::MILLISECONDS;
    return reply;
  }, kj::mv(settings));
  auto firstRequest = env.pool->request(kj::HttpMethod::GET, "/first", env.headers());
  firstRequest.body = nullptr;
  auto second = env.get("/second");
  auto firstResponse = firstRequest.response.wait(env.ws);
  KJ_EXPECT(!second.poll(env.ws));
  env.pool = nullptr;
  KJ_EXPECT_THROW_MESSAGE("ConnectionPool was destroyed", second.wait(env.ws));
  KJ_EXPECT(firstResponse.body->readAllText().wait(env.ws) == "/first");
  firstResponse.body = nullptr;
  env.waitFor([&]() { return env.server->open == 0; });
  KJ_EXPECT(env.server->open == 0);
}

KJ_TEST("ConnectionPool destroyed while a sent request awaits its response lets it finish") {
  Env env([](unsigned, unsigned, kj::StringPtr text) {
    auto reply = echoPath(text);
    reply.delay = 40 * kj::MILLISECONDS;
    return reply;
  });
  auto request = env.pool->request(kj::HttpMethod::GET, "/in-flight", env.headers());
  request.body = nullptr;
  auto response = request.response.eagerlyEvaluate(nullptr);
  env.waitFor([&]() { return env.server->busy > 0; });  // the server has the request
  KJ_ASSERT(env.server->busy == 1);
  env.pool = nullptr;
  auto r = response.wait(env.ws);
  KJ_EXPECT(r.body->readAllText().wait(env.ws) == "/in-flight");
  r.body = nullptr;
  env.waitFor([&]() { return env.server->open == 0; });
  KJ_EXPECT(env.server->open == 0);
}

KJ_TEST("ConnectionPool destroyed with a request still connecting") {
  Env env([](unsigned, unsigned, kj::StringPtr text) { return echoPath(text); });
  auto pending = env.get("/never");
  env.pool = nullptr;
  KJ_EXPECT_THROW(DISCONNECTED, pending.wait(env.ws));
}

}  // namespace
}  // namespace sockfetch
