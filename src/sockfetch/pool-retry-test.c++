// What the pool sends again and what it never does, for the usual request (no body, sent at once
// on an idle connection, with an Attempt made only to send it again): retries performed and
// counted once, the retried request byte for byte the first one (short and long copies, custom
// header tables), cancellation and pool destruction at every point, maxConnections respected,
// connections found lost at request time, hostile upstreams, every connection counted once.

#include "pool.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <unistd.h>

namespace sockfetch {
namespace {

using test::contains;
using test::ok;
using test::pathOf;
using test::ScriptedServer;
using Reply = ScriptedServer::Reply;
using Response = kj::HttpClient::Response;

Reply silentClose() {
  Reply reply;
  reply.closeAfter = true;  // reads the request, closes without a word (the keep-alive race)
  return reply;
}

struct Env: public test::LoopEnv {
  using Script = kj::Function<Reply(unsigned connection, unsigned request, kj::StringPtr text)>;
  Script script;
  kj::Vector<kj::String> seen;       // every request text the server read, in order
  kj::Vector<unsigned> seenOn;       // the connection each came on
  kj::Own<ScriptedServer> server;
  kj::Own<kj::NetworkAddress> address;
  kj::Vector<kj::Duration> connectDelays;  // per connect, in order (missing: none)
  unsigned connectsStarted = 0;
  unsigned failConnectsFrom = 1000;  // connects from this index on fail
  unsigned liveStreams = 0;
  unsigned maxLiveStreams = 0;
  unsigned maxConnections;
  kj::Own<ConnectionPool> pool;

  explicit Env(Script s, ConnectionPool::Settings settings = {})
      : script(kj::mv(s)), maxConnections(settings.maxConnections) {
    server = kj::heap<ScriptedServer>(io, "127.0.0.1",
        [this](unsigned connection, unsigned request, kj::StringPtr text) {
      seen.add(kj::str(text));
      seenOn.add(connection);
      return script(connection, request, text);
    });
    address = server->address();
    pool = kj::heap<ConnectionPool>(timer, table, [this]() { return connect(); },
        kj::mv(settings));
  }

  kj::Promise<kj::Own<kj::AsyncIoStream>> connect() {
    auto index = connectsStarted++;
    if (index >= failConnectsFrom) {
      return KJ_EXCEPTION(DISCONNECTED, "test: connection refused");
    }
    kj::Promise<void> wait = kj::READY_NOW;
    if (index < connectDelays.size() && connectDelays[index] > 0 * kj::MILLISECONDS) {
      wait = timer.afterDelay(connectDelays[index]);
    }
    return wait.then([this]() { return address->connect(); })
        .then([this](kj::Own<kj::AsyncIoStream>&& s) {
      ++liveStreams;
      maxLiveStreams = kj::max(maxLiveStreams, liveStreams);
      return s.attach(kj::defer([this]() { --liveStreams; }));
    });
  }

  kj::Promise<Response> start(kj::HttpMethod method, kj::StringPtr url,
      const kj::HttpHeaders& h, kj::Maybe<uint64_t> size = nullptr) {
    auto request = pool->request(method, url, h, size);
    request.body = nullptr;
    return kj::mv(request.response);
  }

  kj::Promise<kj::String> get(kj::StringPtr url) {
    auto h = headers();
    return start(kj::HttpMethod::GET, url, h).then([](Response&& response) {
      return response.body->readAllText().attach(kj::mv(response.body));
    });
  }

  void check() {
    KJ_EXPECT(pool->getOpenCount() <= maxConnections, pool->getOpenCount(), maxConnections);
    KJ_EXPECT(liveStreams <= maxConnections, liveStreams, maxConnections);
  }

  void checkQuiescent() {
    settle();
    test::expectEveryConnectionCounted(ws, *pool, liveStreams);
    KJ_EXPECT(maxLiveStreams <= maxConnections, maxLiveStreams, maxConnections);
  }
};

ConnectionPool::Settings limit(unsigned maxConnections) {
  ConnectionPool::Settings settings;
  settings.maxConnections = maxConnections;
  return settings;
}

// The first connection serves its first request, then closes on its second (stale); every other
// request is answered with an empty 200 (fits GET and HEAD alike).
Reply staleSecond(unsigned connection, unsigned request, kj::StringPtr) {
  if (connection == 0 && request == 1) return silentClose();
  return ok("");
}

size_t copySize(kj::StringPtr url, const kj::HttpHeaders& headers) {
  // What RequestCopy stores: the url and each header name and value, NUL-terminated.
  size_t size = url.size() + 1;
  headers.forEach([&](kj::StringPtr name, kj::StringPtr value) {
    size += name.size() + value.size() + 2;
  });
  return size;
}

// =================================================================================================

KJ_TEST("a retried bodiless request goes out byte for byte the same across the "
    "inline/heap boundary, for GET and HEAD, expectedBodySize nullptr and 0") {
  for (size_t target: {200, 254, 255, 256, 257, 258, 512, 4000}) {
    for (auto method: {kj::HttpMethod::GET, kj::HttpMethod::HEAD}) {
      for (bool zero: {false, true}) {
        KJ_CONTEXT(target, method, zero);
        Env env(staleSecond);
        env.bounded(env.get("/warm"));
        kj::String url = kj::str("/b?q=", target);
        kj::HttpHeaders h(env.table);
        h.set(kj::HttpHeaderId::HOST, "upstream.test");
        h.add("X-Pad", "");
        size_t base = copySize(url, h);
        KJ_ASSERT(base <= target);
        h.set(kj::HttpHeaderId::HOST, kj::str("upstream.test", kj::repeat('h', target - base)));
        KJ_ASSERT(copySize(url, h) == target, copySize(url, h));
        kj::Maybe<uint64_t> size = nullptr;
        if (zero) size = uint64_t(0);
        auto request = env.pool->request(method, url, h, size);
        // The caller's url and headers are gone once request() returns: scribble over them.
        h.clear();
        url = kj::str("/scribbled-over-with-garbage-of-some-length");
        request.body = nullptr;
        auto response = env.bounded(kj::mv(request.response));
        KJ_EXPECT(response.statusCode == 200);
        env.bounded(response.body->readAllText());
        auto& s = env.pool->getStats();
        KJ_EXPECT(s.retries == 1, s.retries);
        KJ_EXPECT(s.droppedStale == 1, s.droppedStale);
        KJ_EXPECT(s.connectionsOpened == 2, s.connectionsOpened);
        KJ_EXPECT(s.reuses == 1, s.reuses);
        KJ_EXPECT(env.server->accepted == 2);
        KJ_ASSERT(env.seen.size() == 3, env.seen.size());
        KJ_EXPECT(env.seen[2] == env.seen[1], env.seen[1], env.seen[2]);
        auto expectedStart = kj::str(method, " /b?q=", target, " HTTP/1.1\r\nHost: upstream.test");
        KJ_EXPECT(env.seen[1].startsWith(expectedStart), env.seen[1]);
        KJ_EXPECT(!contains(env.seen[1], "Content-Length"), env.seen[1]);
        KJ_EXPECT(!contains(env.seen[1], "Transfer-Encoding"), env.seen[1]);
        KJ_EXPECT(env.seenOn[2] == 1);
        env.checkQuiescent();
      }
    }
  }
}

KJ_TEST("a retried request with a caller table of custom headers, many entries, "
    "duplicates and empty values goes out the same") {
  for (unsigned many: {0u, 3u, 80u}) {
    KJ_CONTEXT(many);
    Env env(staleSecond);
    env.bounded(env.get("/warm"));
    kj::HttpHeaderTable::Builder builder;
    auto custom = builder.add("X-Custom");
    auto lower = builder.add("x-lower-registered");
    builder.add("X-Unused");
    auto callerTable = builder.build();
    kj::HttpHeaders h(*callerTable);
    h.add("X-Before", "b");
    h.set(kj::HttpHeaderId::HOST, "upstream.test");
    h.add("X-Empty", "");
    h.set(custom, "c1");
    h.add("X-Custom", "c2");       // registered: joined with the first
    h.add("X-LOWER-REGISTERED", "");  // registered under another spelling, empty
    h.set(lower, "l");
    h.add("X-Dup", "1");
    h.add("x-dup", "2");
    h.add("X-Dup", "");
    h.add("Accept", "a/b");
    h.add("Accept", "c/d");        // built-in: joined
    for (unsigned i = 0; i < many; i++) {
      h.add(kj::str("X-H", i), i % 3 == 0 ? kj::str("") : kj::str(kj::repeat('v', i)));
    }
    // The header values must outlive `h` while it is alive: HttpHeaders keeps pointers.
    // (add(StringPtr, String) takes ownership; set(id, String) too.)
    auto request = env.pool->request(kj::HttpMethod::GET, "/custom", h);
    h.clear();
    request.body = nullptr;
    auto response = env.bounded(kj::mv(request.response));
    env.bounded(response.body->readAllText());
    KJ_EXPECT(env.pool->getStats().retries == 1);
    KJ_ASSERT(env.seen.size() == 3, env.seen.size());
    KJ_EXPECT(env.seen[2] == env.seen[1], env.seen[1], env.seen[2]);
    KJ_EXPECT(contains(env.seen[1], "X-Custom: c1, c2\r\n"), env.seen[1]);
    KJ_EXPECT(contains(env.seen[1], "X-Dup: \r\n"), env.seen[1]);
    KJ_EXPECT(contains(env.seen[1], "X-Empty: \r\n"), env.seen[1]);
    if (many > 0) {
      KJ_EXPECT(contains(env.seen[1], kj::str("X-H", many - 1, ": ")), env.seen[1]);
    }
    env.checkQuiescent();
  }
}

KJ_TEST("a GET with Transfer-Encoding (or a body size) is not sent as a bodiless "
    "request: its body goes out") {
  Env env([](unsigned, unsigned, kj::StringPtr text) {
    bool body = contains(text, "abc") || contains(text, "xyz");
    return ok(kj::str(pathOf(text), "|", body ? "body" : "nobody"));
  });
  env.bounded(env.get("/warm"));
  {
    auto h = env.headers();
    h.set(kj::HttpHeaderId::TRANSFER_ENCODING, "chunked");
    auto request = env.pool->request(kj::HttpMethod::GET, "/te", h);
    env.bounded(request.body->write("abc", 3));
    request.body = nullptr;
    auto response = env.bounded(kj::mv(request.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "/te|body");
  }
  KJ_ASSERT(env.seen.size() == 2);
  KJ_EXPECT(contains(env.seen[1], "Transfer-Encoding: chunked"), env.seen[1]);
  KJ_EXPECT(env.seen[1].endsWith("\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), env.seen[1]);
  {
    auto h = env.headers();
    auto request = env.pool->request(kj::HttpMethod::GET, "/sized", h, uint64_t(3));
    env.bounded(request.body->write("xyz", 3));
    request.body = nullptr;
    auto response = env.bounded(kj::mv(request.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "/sized|body");
  }
  KJ_EXPECT(contains(env.seen.back(), "Content-Length: 3\r\n"), env.seen.back());
  KJ_EXPECT(env.seen.back().endsWith("\r\n\r\nxyz"), env.seen.back());
  {
    // And a bodiless one refuses a body.
    auto h = env.headers();
    auto request = env.pool->request(kj::HttpMethod::GET, "/none", h);
    KJ_EXPECT_THROW_MESSAGE("without a body", env.bounded(request.body->write("x", 1)));
    request.body = nullptr;
    auto response = env.bounded(kj::mv(request.response));
    KJ_EXPECT(env.bounded(response.body->readAllText()) == "/none|nobody");
  }
  KJ_EXPECT(env.pool->getStats().reuses == 3);
  KJ_EXPECT(env.server->accepted == 1);
  env.checkQuiescent();
}

KJ_TEST("a GET with Transfer-Encoding that hits a stale connection after its body went "
    "out is sent once, not retried") {
  Env env(staleSecond);
  env.bounded(env.get("/warm"));
  auto h = env.headers();
  h.set(kj::HttpHeaderId::TRANSFER_ENCODING, "chunked");
  auto request = env.pool->request(kj::HttpMethod::GET, "/te", h);
  env.bounded(request.body->write("abc", 3));
  request.body = nullptr;  // the body ends: the server has read the whole request, and closes
  auto e = env.failureOf(kj::mv(request.response));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  env.settle();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 0, s.retries);
  KJ_EXPECT(env.server->accepted == 1);
  env.checkQuiescent();
}

KJ_TEST("the retried request failing too is not sent a third time") {
  Env env([](unsigned connection, unsigned request, kj::StringPtr) {
    if (connection == 0 && request == 0) return ok("");
    return silentClose();  // the stale one, and the retry on a new connection
  });
  env.bounded(env.get("/warm"));
  auto e = env.failureOf(env.get("/x"));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  env.settle();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 1, s.retries);
  KJ_EXPECT(env.server->accepted == 2, env.server->accepted);
  KJ_EXPECT(s.connectionsOpened == 2);
  KJ_EXPECT(s.droppedStale == 1, s.droppedStale);
  KJ_EXPECT(s.droppedFailed == 1, s.droppedFailed);
  KJ_EXPECT(env.seen.size() == 3);
  env.checkQuiescent();
}

KJ_TEST("the retry's connection cannot be opened: one clear failure, counted") {
  Env env(staleSecond);
  env.bounded(env.get("/warm"));
  env.failConnectsFrom = 1;  // the retry's connect fails
  auto e = env.failureOf(env.get("/x"));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 1, s.retries);
  KJ_EXPECT(s.connectFailures == 1, s.connectFailures);
  KJ_EXPECT(s.droppedStale == 1, s.droppedStale);
  KJ_EXPECT(env.server->accepted == 1);
  KJ_EXPECT(s.connectionsOpened == 1);
  env.checkQuiescent();
}

KJ_TEST("a stale GET on a non-retriable exception type, a 5xx, or a partial response "
    "is not retried") {
  // A response that started (some bytes) and then the connection closed: no retry.
  Env env([](unsigned connection, unsigned request, kj::StringPtr) {
    if (connection == 0 && request == 1) {
      Reply reply;
      reply.bytes = kj::str("HTTP/1.1 200 OK\r\nContent-Le");
      reply.closeAfter = true;
      return reply;
    }
    if (connection == 0 && request == 2) {
      return ok("");
    }
    return ok("");
  });
  env.bounded(env.get("/warm"));
  auto e = env.failureOf(env.get("/partial"));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED ||
      e.getType() == kj::Exception::Type::FAILED, e);
  env.settle();
  KJ_EXPECT(env.pool->getStats().retries == 0);
  KJ_EXPECT(env.server->accepted == 1);
  env.checkQuiescent();
}

// =================================================================================================
// Pool destroyed, cancellation

KJ_TEST("pool destroyed while a bodiless request is in flight, then the request fails: "
    "no retry, a clear error, nothing leaked") {
  Env env([](unsigned connection, unsigned request, kj::StringPtr) {
    if (connection == 0 && request == 1) {
      auto reply = silentClose();
      reply.delay = 30 * kj::MILLISECONDS;
      return reply;
    }
    return ok("");
  });
  env.bounded(env.get("/warm"));
  auto pending = env.get("/x");
  env.waitFor([&]() { return env.seen.size() == 2; });
  KJ_ASSERT(env.seen.size() == 2);
  auto before = env.pool->getStats();
  KJ_EXPECT(before.reuses == 1);
  env.pool = nullptr;
  auto e = env.failureOf(kj::mv(pending));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  env.settle();
  KJ_EXPECT(env.server->accepted == 1, "retried after the pool was destroyed");
  KJ_EXPECT(env.seen.size() == 2);
  env.waitFor([&]() { return env.liveStreams == 0; });
  KJ_EXPECT(env.liveStreams == 0, env.liveStreams);
}

KJ_TEST("pool destroyed while the retry of a bodiless request connects") {
  Env env(staleSecond);
  env.connectDelays.add(0 * kj::MILLISECONDS);
  env.connectDelays.add(200 * kj::MILLISECONDS);
  env.bounded(env.get("/warm"));
  auto pending = env.get("/x");
  env.waitFor([&]() { return env.pool->getStats().retries == 1; });
  KJ_ASSERT(env.pool->getStats().retries == 1);
  KJ_ASSERT(env.connectsStarted == 2);
  env.pool = nullptr;
  auto e = env.failureOf(kj::mv(pending));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
  KJ_EXPECT(contains(e.getDescription(), "destroyed"), e);
  env.settle(250 * kj::MILLISECONDS);
  KJ_EXPECT(env.liveStreams == 0, env.liveStreams);
  KJ_EXPECT(env.server->accepted == 1, env.server->accepted);
}

KJ_TEST("pool destroyed while the retry of a bodiless request is in flight") {
  Env env([](unsigned connection, unsigned request, kj::StringPtr) {
    if (connection == 0 && request == 1) return silentClose();
    if (connection == 1) {
      auto reply = ok("late");
      reply.delay = 30 * kj::MILLISECONDS;
      return reply;
    }
    return ok("");
  });
  env.bounded(env.get("/warm"));
  auto pending = env.get("/x");
  env.waitFor([&]() { return env.seen.size() == 3; });
  KJ_ASSERT(env.seen.size() == 3);
  env.pool = nullptr;
  KJ_EXPECT(env.bounded(kj::mv(pending)) == "late");
  env.waitFor([&]() { return env.liveStreams == 0; });
  KJ_EXPECT(env.liveStreams == 0, env.liveStreams);
}

void cancelAt(int point) {
  // 0: before the fast-path response; 1: during the retry's connect; 2: during the retry's
  // exchange.
  KJ_CONTEXT(point);
  Env env([point](unsigned connection, unsigned request, kj::StringPtr) {
    if (connection == 0 && request == 1) {
      if (point == 0) {
        auto reply = ok("slow");
        reply.delay = 100 * kj::MILLISECONDS;
        return reply;
      }
      return silentClose();
    }
    if (connection == 1 && point == 2) {
      auto reply = ok("slow retry");
      reply.delay = 100 * kj::MILLISECONDS;
      return reply;
    }
    return ok("");
  }, limit(2));
  env.connectDelays.add(0 * kj::MILLISECONDS);
  if (point == 1) env.connectDelays.add(100 * kj::MILLISECONDS);
  env.bounded(env.get("/warm"));
  auto pending = env.get("/x");
  if (point == 0) {
    env.waitFor([&]() { return env.seen.size() == 2; });
    KJ_ASSERT(env.seen.size() == 2);
  } else if (point == 1) {
    env.waitFor([&]() { return env.connectsStarted == 2; });
    KJ_ASSERT(env.connectsStarted == 2);
    KJ_ASSERT(env.liveStreams <= 1);
  } else {
    env.waitFor([&]() { return env.seen.size() == 3; });
    KJ_ASSERT(env.seen.size() == 3);
  }
  env.check();
  pending = nullptr;
  env.settle(150 * kj::MILLISECONDS);
  env.check();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == (point == 0 ? 0u : 1u), s.retries);
  KJ_EXPECT(s.droppedStale == (point == 0 ? 0u : 1u), s.droppedStale);
  KJ_EXPECT(s.droppedAbandoned == (point == 1 ? 0u : 1u), s.droppedAbandoned);
  env.checkQuiescent();
  // The pool still works afterwards.
  KJ_EXPECT(env.bounded(env.get("/after")) == "");
  env.checkQuiescent();
}

KJ_TEST("a bodiless request cancelled before its response") { cancelAt(0); }
KJ_TEST("a bodiless request cancelled during its retry's connect") { cancelAt(1); }
KJ_TEST("a bodiless request cancelled during its retry's exchange") { cancelAt(2); }

KJ_TEST("cancelled in the same turn the stale failure is noticed, at many offsets") {
  for (int turns = 0; turns < 12; turns++) {
    KJ_CONTEXT(turns);
    Env env(staleSecond, limit(1));
    env.bounded(env.get("/warm"));
    {
      auto pending = env.get("/x");
      for (int i = 0; i < turns; i++) kj::evalLater([]() {}).wait(env.ws);
      env.check();
    }
    env.settle();
    env.check();
    env.checkQuiescent();
    KJ_EXPECT(env.bounded(env.get("/after")) == "");
    env.checkQuiescent();
  }
}

// =================================================================================================
// maxConnections

KJ_TEST("maxConnections 1: the retry waits for the stale connection to go, never "
    "holding two") {
  Env env(staleSecond, limit(1));
  env.bounded(env.get("/warm"));
  KJ_EXPECT(env.bounded(env.get("/x")) == "");
  env.check();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 1);
  KJ_EXPECT(s.connectionsOpened == 2);
  KJ_EXPECT(env.maxLiveStreams <= 1, env.maxLiveStreams);
  env.checkQuiescent();
}

KJ_TEST("maxConnections 2 with another idle connection: the retry gets a new "
    "connection, never three") {
  Env env([](unsigned connection, unsigned request, kj::StringPtr text) {
    if (pathOf(text) == "/stale" && request > 0) return silentClose();
    (void)connection;
    return ok(pathOf(text));
  }, limit(2));
  {
    auto a = env.get("/a");
    auto b = env.get("/b");
    KJ_EXPECT(env.bounded(kj::mv(a)) == "/a");
    KJ_EXPECT(env.bounded(kj::mv(b)) == "/b");
  }
  KJ_ASSERT(env.pool->getIdleCount() == 2);
  KJ_EXPECT(env.bounded(env.get("/stale")) == "/stale");
  env.check();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 1);
  KJ_EXPECT(s.connectionsOpened == 3, s.connectionsOpened);
  KJ_EXPECT(env.maxLiveStreams <= 2, env.maxLiveStreams);
  env.checkQuiescent();
}

KJ_TEST("maxConnections 2, both busy with a waiter queued, one stale: the retry gets "
    "a fresh connection, counts stay true") {
  Env env([](unsigned, unsigned request, kj::StringPtr text) {
    auto path = pathOf(text);
    if (path.startsWith("/stale") && request > 0) return silentClose();
    auto reply = ok(path);
    if (path.startsWith("/slow")) reply.delay = 40 * kj::MILLISECONDS;
    return reply;
  }, limit(2));
  {
    auto a = env.get("/a");
    auto b = env.get("/b");
    env.bounded(kj::mv(a));
    env.bounded(kj::mv(b));
  }
  auto slow = env.get("/slow");
  auto stale = env.get("/stale");
  auto waiting = env.get("/waiting");
  KJ_EXPECT(env.bounded(kj::mv(stale)) == "/stale");
  KJ_EXPECT(env.bounded(kj::mv(slow)) == "/slow");
  KJ_EXPECT(env.bounded(kj::mv(waiting)) == "/waiting");
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 1);
  KJ_EXPECT(s.droppedStale == 1);
  KJ_EXPECT(env.maxLiveStreams <= 2, env.maxLiveStreams);
  KJ_EXPECT(env.server->pipelined == 0);
  env.checkQuiescent();
}

// =================================================================================================
// Connection lost while idle, found at request time (fetcher.request() throws), on controlled
// transports.

struct PeerEnv: public test::LoopEnv {
  kj::Vector<kj::Own<test::Peer>> peers;
  kj::Vector<kj::Own<kj::AsyncIoStream>> clients;  // handed out in order by the connector
  unsigned handed = 0;
  kj::Own<ConnectionPool> pool;

  explicit PeerEnv(unsigned n, ConnectionPool::Settings settings = {}) {
    for (unsigned i = 0; i < n; i++) {
      auto t = test::tcpTransport(io);
      clients.add(kj::mv(t.client));
      peers.add(kj::heap<test::Peer>(ws, kj::mv(t.server)));
    }
    pool = kj::heap<ConnectionPool>(timer, table,
        [this]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      KJ_REQUIRE(handed < clients.size(), "no more connections");
      return kj::mv(clients[handed++]);
    }, kj::mv(settings));
  }

  void serveOne(test::Peer& peer, kj::StringPtr body) {
    peer.readRequest();
    peer.send(kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", body.size(), "\r\n\r\n", body));
  }

  void warmFirst() {
    // One request answered on the first connection, which is then idle in the pool.
    auto h = headers();
    auto request = pool->request(kj::HttpMethod::GET, "/warm", h);
    request.body = nullptr;
    auto response = kj::mv(request.response);
    serveOne(*peers[0], "w");
    auto r = bounded(kj::mv(response));
    KJ_EXPECT(bounded(r.body->readAllText()) == "w");
  }
};

void lostAtRequestTime(bool poison, bool zero, kj::HttpMethod method) {
  KJ_CONTEXT(poison, zero, method);
  PeerEnv env(2);
  env.warmFirst();
  KJ_ASSERT(env.pool->getIdleCount() == 1);
  if (poison) {
    int fd = KJ_ASSERT_NONNULL(env.peers[0]->getStream().getFd());
    KJ_SYSCALL(::write(fd, "HTTP/1.1 200 OK\r\n", 17));
  } else {
    env.peers[0]->close();
  }
  // No turn of the event loop: the pool still thinks the connection idle.
  KJ_ASSERT(env.pool->getIdleCount() == 1);
  auto longValue = kj::str(kj::repeat('z', 240));
  auto h = env.headers();
  h.add("X-Long", longValue);
  kj::Maybe<uint64_t> size = nullptr;
  if (zero) size = uint64_t(0);
  auto request = env.pool->request(method, "/lost", h, size);
  request.body = nullptr;
  h.clear();
  auto response = kj::mv(request.response);
  auto text = env.peers[1]->readRequest();
  KJ_EXPECT(text == kj::str(method, " /lost HTTP/1.1\r\nHost: upstream.test\r\nX-Long: ",
      longValue, "\r\n\r\n"), text);
  env.peers[1]->send("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
  auto r = env.bounded(kj::mv(response));
  KJ_EXPECT(r.statusCode == 200);
  env.bounded(r.body->readAllText());
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 0, "a request that was sent once counted as sent again", s.retries);
  KJ_EXPECT(s.connectionsOpened == 2);
  KJ_EXPECT(s.reuses == 0, "a request found lost before sending is no reuse", s.reuses);
  if (poison) {
    KJ_EXPECT(s.droppedUnsolicitedBytes == 1, s.droppedUnsolicitedBytes);
  } else {
    KJ_EXPECT(s.droppedPeerClosedIdle == 1, s.droppedPeerClosedIdle);
  }
  KJ_EXPECT(s.droppedStale == 0);
  env.settle();
  KJ_EXPECT(env.pool->getOpenCount() == 1, env.pool->getOpenCount());
  KJ_EXPECT(env.pool->getIdleCount() == 1);
  KJ_EXPECT(s.connectionsOpened == env.pool->getOpenCount() + s.dropped());
  if (!poison) return;
  // Nothing of the request went to the poisoned connection; it was closed.
  KJ_EXPECT(env.drainsToEnd(*env.peers[0]), "the poisoned connection was written to or kept");
}

KJ_TEST("an idle connection found closed at request time: the bodiless request goes "
    "out on a new connection, once, and is no retry (nothing was sent before)") {
  for (auto method: {kj::HttpMethod::GET, kj::HttpMethod::HEAD}) {
    for (bool zero: {false, true}) lostAtRequestTime(false, zero, method);
  }
}

KJ_TEST("an idle connection found poisoned at request time: the bodiless request goes "
    "out on a new connection, once, and is no retry (nothing was sent before)") {
  for (auto method: {kj::HttpMethod::GET, kj::HttpMethod::HEAD}) {
    for (bool zero: {false, true}) lostAtRequestTime(true, zero, method);
  }
}

KJ_TEST("an idle connection found lost at request time with maxConnections 1: the "
    "request gets the one place") {
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  PeerEnv env(2, kj::mv(settings));
  env.warmFirst();
  env.peers[0]->close();
  auto h = env.headers();
  auto request = env.pool->request(kj::HttpMethod::GET, "/lost", h);
  request.body = nullptr;
  KJ_EXPECT(env.pool->getOpenCount() <= 1, env.pool->getOpenCount());
  auto response = kj::mv(request.response);
  env.serveOne(*env.peers[1], "ok");
  auto r = env.bounded(kj::mv(response));
  KJ_EXPECT(env.bounded(r.body->readAllText()) == "ok");
  KJ_EXPECT(env.pool->getOpenCount() <= 1, env.pool->getOpenCount());
  KJ_EXPECT(env.pool->getStats().retries == 0);
  KJ_EXPECT(env.pool->getStats().droppedPeerClosedIdle == 1);
}

void lostThenGiveUp(bool destroyPool) {
  // The idle connection is found lost inside request() (fetcher.request() throws), the request
  // waits for another connection; then the caller gives up, or the pool is destroyed.
  KJ_CONTEXT(destroyPool);
  PeerEnv env(2);
  env.warmFirst();
  env.peers[0]->close();
  auto h = env.headers();
  auto request = env.pool->request(kj::HttpMethod::GET, "/lost", h);
  request.body = nullptr;
  KJ_EXPECT(env.pool->getStats().droppedPeerClosedIdle == 1);
  auto response = kj::mv(request.response);
  if (destroyPool) {
    env.pool = nullptr;
    auto e = env.failureOf(kj::mv(response));
    KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED, e);
    KJ_EXPECT(contains(e.getDescription(), "destroyed"), e);
  } else {
    response = nullptr;
    env.settle();
    KJ_EXPECT(env.pool->getOpenCount() <= 1, env.pool->getOpenCount());
    auto& s = env.pool->getStats();
    KJ_EXPECT(s.connectionsOpened == env.pool->getOpenCount() + s.dropped(),
        s.connectionsOpened, env.pool->getOpenCount(), s.dropped());
  }
  env.settle();
  // Nothing reached the second peer, or if the connection was made, no request on it.
  KJ_EXPECT(env.peers[1]->readWouldBlock() || env.peers[1]->sawEof());
}

KJ_TEST("found lost at request time, then the caller gives up while another connection opens") {
  lostThenGiveUp(false);
}

KJ_TEST("found lost at request time, then the pool is destroyed while another connection "
    "opens") {
  lostThenGiveUp(true);
}

KJ_TEST("pool destroyed right after a bodiless request() returns: it still completes") {
  Env env([](unsigned, unsigned, kj::StringPtr text) { return ok(pathOf(text)); });
  env.bounded(env.get("/warm"));
  auto pending = env.get("/x");
  env.pool = nullptr;
  KJ_EXPECT(env.bounded(kj::mv(pending)) == "/x");
  env.waitFor([&]() { return env.liveStreams == 0; });
  KJ_EXPECT(env.liveStreams == 0, env.liveStreams);
}

// =================================================================================================
// An upstream that poisons idle connections, and a mix

KJ_TEST("an upstream that poisons every idle connection: every request answered, "
    "each connection counted once") {
  Env env([](unsigned, unsigned, kj::StringPtr text) {
    auto reply = ok(pathOf(text));
    reply.thenUnsolicited = kj::str("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil");
    return reply;
  }, limit(3));
  for (int i = 0; i < 12; i++) {
    auto path = kj::str("/p", i);
    KJ_EXPECT(env.bounded(env.get(path)) == path);
    // The unsolicited bytes come 5 ms after each answer: a request sent before then would get
    // them as its answer (indistinguishable from a real one), so wait for them.
    env.settle(kj::MILLISECONDS * (i % 2 == 0 ? 15 : 30));
    env.check();
  }
  env.settle();
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == 0, s.retries);
  KJ_EXPECT(s.connectionsOpened == 12, s.connectionsOpened);
  KJ_EXPECT(s.droppedUnsolicitedBytes == 12, s.droppedUnsolicitedBytes);
  KJ_EXPECT(env.server->accepted == s.connectionsOpened);
  env.checkQuiescent();
}

KJ_TEST("many stale retries and early drops in a row keep every count true") {
  // Every connection answers its first request, and silently closes on its second.
  Env env([](unsigned, unsigned request, kj::StringPtr text) {
    if (request == 1) return silentClose();
    return ok(pathOf(text));
  }, limit(3));
  unsigned answered = 0;
  for (int round = 0; round < 8; round++) {
    kj::Vector<kj::Promise<kj::String>> batch;
    for (int i = 0; i < 4; i++) batch.add(env.get(kj::str("/r", round, "/", i)));
    if (round % 3 == 1) batch.removeLast();  // one given up at once
    for (auto& p: batch) {
      env.check();
      auto outcome = p.then([](kj::String s) -> bool { return true; },
          [](kj::Exception&&) -> bool { return false; });
      if (env.bounded(kj::mv(outcome))) ++answered;
    }
    env.check();
  }
  auto& s = env.pool->getStats();
  KJ_EXPECT(s.retries == s.droppedStale, s.retries, s.droppedStale);
  KJ_EXPECT(env.server->pipelined == 0);
  KJ_EXPECT(env.server->accepted == s.connectionsOpened);
  env.checkQuiescent();
  (void)answered;
}

}  // namespace
}  // namespace sockfetch
