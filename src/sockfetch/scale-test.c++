// Scale and slow-leak checks: many requests through a StreamFetcher and a ConnectionPool against
// an in-process loopback upstream, on the good path and on every failure path, with heap in use
// and the pool's counts checked to stay flat after warm-up; and counts that must stay bounded
// however long the pool runs.

#include "pool.h"

#include <sockfetch/connector.h>
#include <sockfetch/kj-compat.h>
#include <sockfetch/stream-fetcher.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/vector.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#if defined(__SANITIZE_ADDRESS__)
extern "C" size_t __sanitizer_get_current_allocated_bytes();
// From <sanitizer/allocator_interface.h>: mallinfo2() does not see ASan's allocator.
#endif

namespace sockfetch {
namespace {

size_t heapInUse() {
  // Bytes the program has allocated and not freed.
#if defined(__SANITIZE_ADDRESS__)
  return __sanitizer_get_current_allocated_bytes();
#else
  return mallinfo2().uordblks;
#endif
}

unsigned openFds() {
  // File descriptors this process has open.
  unsigned n = 0;
  DIR* dir = opendir("/proc/self/fd");
  KJ_ASSERT(dir != nullptr);
  while (readdir(dir) != nullptr) ++n;
  closedir(dir);
  return n;
}

unsigned scaled(unsigned n) {
  // SCALE_FACTOR=k multiplies the counts (for measuring by hand; the tests use the defaults).
  const char* f = getenv("SCALE_FACTOR");
  return f == nullptr ? n : n * atoi(f);
}

bool verbose() { return getenv("SCALE_VERBOSE") != nullptr; }

// =================================================================================================
// Upstream: a raw loopback HTTP/1.1 server whose answer depends on the request's path.
//   /ok            200, Content-Length
//   /chunked       200, chunked with a trailer
//   /close         200 with `Connection: close`, then closes
//   /unsolicited   200, then bytes nobody asked for
//   /reset         reads the request, resets the connection
//   /silent        reads the request, closes without answering (stale keep-alive race)
//   /hang          never answers
//   /big           200 with a 256 KiB body
//   /bighead       200 with ~48 KiB of headers
//   /idleclose[MS] 200, then closes the idle connection MS (default 1) ms later
// A request with a Content-Length body has its body read (and dropped) first.

class Upstream {
public:
  explicit Upstream(kj::AsyncIoContext& io): io(io), tasks(errors) {
    auto parsed = io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope);
    listener = parsed->listen();
    tasks.add(acceptLoop());
    bigBody = kj::heapString(256 * 1024);
    memset(bigBody.begin(), 'b', bigBody.size());
    kj::Vector<char> h;
    for (int i = 0; i < 480; i++) {
      auto line = kj::str("X-Filler-", i, ": ", kj::repeat('h', 80), "\r\n");
      h.addAll(line);
    }
    bigHead = kj::heapString(h.begin(), h.size());
  }

  kj::Own<kj::NetworkAddress> address() {
    return io.provider->getNetwork().parseAddress("127.0.0.1", listener->getPort())
        .wait(io.waitScope);
  }

  unsigned accepted = 0;
  unsigned open = 0;

private:
  struct Errors final: public kj::TaskSet::ErrorHandler {
    void taskFailed(kj::Exception&&) override {}
  };
  struct Conn {
    Upstream& up;
    kj::Own<kj::AsyncIoStream> stream;
    kj::Vector<char> buffer;
    Conn(Upstream& up, kj::Own<kj::AsyncIoStream> s): up(up), stream(kj::mv(s)) { ++up.open; }
    ~Conn() noexcept(false) { --up.open; }
  };

  kj::AsyncIoContext& io;
  Errors errors;
  kj::Own<kj::ConnectionReceiver> listener;
  kj::String bigBody;
  kj::String bigHead;
  kj::TaskSet tasks;

  kj::Promise<void> acceptLoop() {
    return listener->accept().then([this](kj::Own<kj::AsyncIoStream>&& stream) {
      ++accepted;
      auto conn = kj::heap<Conn>(*this, kj::mv(stream));
      auto& c = *conn;
      tasks.add(serve(c).attach(kj::mv(conn)));
      return acceptLoop();
    });
  }

  static kj::Maybe<size_t> requestEnd(kj::ArrayPtr<const char> b) {
    for (size_t i = 0; i + 4 <= b.size(); i++) {
      if (memcmp(b.begin() + i, "\r\n\r\n", 4) == 0) {
        size_t bodyLen = 0;
        auto head = kj::heapString(b.begin(), i);
        for (auto& ch: head) ch = tolower(ch);
        const char* cl = strstr(head.cStr(), "content-length: ");
        if (cl != nullptr) bodyLen = strtoul(cl + 16, nullptr, 10);
        if (b.size() < i + 4 + bodyLen) return nullptr;
        return i + 4 + bodyLen;
      }
    }
    return nullptr;
  }

  void reset(Conn& c) {
    KJ_IF_SOME(fd, c.stream->getFd()) {
      struct linger lin = {1, 0};
      setsockopt(fd, SOL_SOCKET, SO_LINGER, &lin, sizeof(lin));
    }
  }

  kj::Promise<void> drain(Conn& c) {
    // Never answers; reads until the client closes.
    c.buffer.resize(4096);
    return c.stream->tryRead(c.buffer.begin(), 1, 4096).then([this, &c](size_t n)
        -> kj::Promise<void> {
      if (n == 0) return kj::READY_NOW;
      return drain(c);
    });
  }

  kj::Promise<void> serve(Conn& c) {
    KJ_IF_SOME(len, requestEnd(c.buffer)) {
      auto text = kj::heapString(c.buffer.begin(), len);
      kj::Vector<char> rest;
      rest.addAll(c.buffer.begin() + len, c.buffer.end());
      c.buffer = kj::mv(rest);
      auto sp = text.findFirst(' ').orDefault(0) + 1;
      auto ep = sp;
      while (ep < text.size() && text[ep] != ' ' && text[ep] != '?') ep++;
      auto path = kj::heapString(text.begin() + sp, ep - sp);
      kj::String reply;
      bool closeAfter = false;
      if (path == "/ok") {
        reply = kj::str("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
      } else if (path == "/chunked") {
        reply = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n");
      } else if (path == "/close") {
        reply = kj::str("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello");
        closeAfter = true;
      } else if (path == "/unsolicited") {
        reply = kj::str("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloGARBAGE");
      } else if (path == "/reset") {
        reset(c);
        return kj::READY_NOW;
      } else if (path == "/silent") {
        return kj::READY_NOW;
      } else if (path == "/hang") {
        return drain(c);
      } else if (path == "/big") {
        reply = kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", bigBody.size(), "\r\n\r\n",
            bigBody);
      } else if (path == "/bighead") {
        reply = kj::str("HTTP/1.1 200 OK\r\n", bigHead, "Content-Length: 5\r\n\r\nhello");
      } else if (path.startsWith("/idleclose")) {
        auto ms = path.size() > 10 ? atoi(path.cStr() + 10) : 1;
        reply = kj::str("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        auto& r = reply;
        auto write = writeAll(*c.stream, r.asBytes()).attach(kj::mv(reply));
        return write.then([this, ms]() {
          return io.provider->getTimer().afterDelay(ms * kj::MILLISECONDS);
        });
      } else {
        reply = kj::str("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
      }
      auto& r = reply;
      auto write = writeAll(*c.stream, r.asBytes()).attach(kj::mv(reply));
      if (closeAfter) return kj::mv(write);
      return write.then([this, &c]() { return serve(c); });
    }
    c.buffer.reserve(c.buffer.size() + 4096);
    auto* at = c.buffer.end();
    size_t room = c.buffer.capacity() - c.buffer.size();
    c.buffer.resize(c.buffer.size() + room);
    size_t before = c.buffer.size() - room;
    return c.stream->tryRead(at, 1, room).then([this, &c, before](size_t n) -> kj::Promise<void> {
      c.buffer.resize(before + n);
      if (n == 0) return kj::READY_NOW;
      return serve(c);
    });
  }
};

struct Env {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::WaitScope& ws = io.waitScope;
  kj::Timer& timer = io.provider->getTimer();
  kj::HttpHeaderTable table;
  Upstream upstream{io};
  kj::Own<kj::NetworkAddress> address = upstream.address();

  kj::HttpHeaders headers() {
    kj::HttpHeaders h(table);
    h.set(kj::HttpHeaderId::HOST, "upstream.test");
    return h;
  }

  void turns(int n = 4) {
    for (int i = 0; i < n; i++) kj::evalLater([]() {}).wait(ws);
  }
  void settle(kj::Duration d = 5 * kj::MILLISECONDS) { timer.afterDelay(d).wait(ws); }
};

kj::Promise<size_t> readAllCounted(kj::Own<kj::AsyncInputStream> body) {
  // Reads the body to its end, returning its size.
  auto buf = kj::heapArray<kj::byte>(16384);
  auto& in = *body;
  auto ptr = buf.begin();
  struct Loop {
    static kj::Promise<size_t> go(kj::AsyncInputStream& in, kj::byte* p, size_t total) {
      return in.tryRead(p, 1, 16384).then([&in, p, total](size_t n) -> kj::Promise<size_t> {
        if (n == 0) return total;
        return go(in, p, total + n);
      });
    }
  };
  return Loop::go(in, ptr, 0).attach(kj::mv(buf), kj::mv(body));
}

void report(kj::StringPtr what, size_t n, size_t before, size_t after) {
  if (verbose()) {
    fprintf(stderr, "%s: heap %zu -> %zu (%+ld bytes over %zu more rounds, %.3f B/round)\n",
        what.cStr(), before, after, (long)after - (long)before, n,
        ((double)after - (double)before) / n);
  }
}

// =================================================================================================
// StreamFetcher: the good path, on one connection.

KJ_TEST("StreamFetcher: heap stays flat over many reused exchanges") {
  Env env;
  auto stream = env.address->connect().wait(env.ws);
  StreamFetcher::Settings settings;
  settings.timer = env.timer;
  StreamFetcher fetcher(kj::mv(stream), env.table, settings);
  auto one = [&](kj::StringPtr url) {
    auto req = fetcher.request(kj::HttpMethod::GET, url, env.headers());
    req.body = nullptr;
    auto response = req.response.wait(env.ws);
    KJ_ASSERT(response.statusCode == 200);
    readAllCounted(kj::mv(response.body)).wait(env.ws);
  };
  const char* urls[] = {"/ok", "/chunked", "/big", "/bighead"};
  unsigned warm = 400, n = scaled(4000);
  for (unsigned i = 0; i < warm; i++) one(urls[i % 4]);
  env.turns();
  size_t before = heapInUse();
  for (unsigned i = 0; i < n; i++) one(urls[i % 4]);
  env.turns();
  size_t after = heapInUse();
  report("fetcher ok/chunked/big/bighead", n, before, after);
  KJ_EXPECT(fetcher.getState() == StreamFetcher::State::IDLE);
  KJ_EXPECT(after < before + 64 * 1024, before, after);
}

// =================================================================================================
// ConnectionPool: a mix of every path, concurrently, through a pool smaller than the load.

struct PoolEnv: public Env {
  kj::Own<ConnectionPool> pool;
  unsigned connectCalls = 0;
  unsigned failEveryNthConnect = 0;

  explicit PoolEnv(ConnectionPool::Settings settings) {
    auto& addr = *address;
    pool = kj::heap<ConnectionPool>(timer, table,
        [this, &addr]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      ++connectCalls;
      if (failEveryNthConnect > 0 && connectCalls % failEveryNthConnect == 0) {
        return KJ_EXCEPTION(DISCONNECTED, "connect refused (test)");
      }
      return addr.connect();
    }, kj::mv(settings));
  }
};

kj::Promise<void> oneThroughPool(PoolEnv& env, unsigned i) {
  // Request number `i` of the mix; never fails (failures are expected on some paths).
  static const char* const PATHS[] = {
      "/ok", "/chunked", "/close", "/unsolicited", "/reset", "/silent", "/ok", "/idleclose",
      "/big", "/ok", "/hang", "/ok", "/bighead", "/ok", "/ok", "/ok"};
  unsigned kind = i % 16;
  auto url = kj::str(PATHS[kind], "?n=", i);
  auto req = [&]() {
    if (i % 7 == 3) {
      // A POST with a small (buffered, replayable) body.
      auto r = env.pool->request(kj::HttpMethod::POST, url, env.headers(), uint64_t(11));
      writeAll(*r.body, "hello world"_kj.asBytes()).wait(env.ws);
      r.body = nullptr;
      return r;
    }
    auto r = env.pool->request(kj::HttpMethod::GET, url, env.headers());
    r.body = nullptr;
    return r;
  }();
  auto response = kj::mv(req.response);
  if (kind == 10) {
    // /hang: give up after a moment (the request is cancelled).
    return response.ignoreResult().catch_([](kj::Exception&&) {})
        .exclusiveJoin(env.timer.afterDelay(2 * kj::MILLISECONDS));
  }
  bool dropEarly = kind == 8 && (i / 16) % 2 == 0;
  return response.then([dropEarly](kj::HttpClient::Response&& r) -> kj::Promise<void> {
    if (dropEarly) {
      // Reads a little of the body, then drops it.
      auto buf = kj::heapArray<kj::byte>(100);
      auto& body = *r.body;
      return body.tryRead(buf.begin(), 1, 100).ignoreResult().attach(kj::mv(buf),
          kj::mv(r.body));
    }
    return readAllCounted(kj::mv(r.body)).ignoreResult();
  }).catch_([](kj::Exception&&) {});
}

void runMix(PoolEnv& env, unsigned from, unsigned count, unsigned concurrency) {
  // `count` requests of the mix, `concurrency` at a time.
  unsigned next = from;
  unsigned end = from + count;
  while (next < end) {
    kj::Vector<kj::Promise<void>> batch;
    for (unsigned j = 0; j < concurrency && next < end; j++) {
      batch.add(oneThroughPool(env, next++));
    }
    kj::joinPromises(batch.releaseAsArray()).wait(env.ws);
  }
}

KJ_TEST("ConnectionPool: heap and counts stay flat over a long mix of good and failing exchanges") {
  ConnectionPool::Settings settings;
  settings.maxConnections = 4;
  settings.maxIdleConnections = 3;
  settings.maxWaiting = 1024;
  settings.waitTimeout = 1 * kj::SECONDS;
  settings.idleTimeout = 3 * kj::MILLISECONDS;
  settings.maxRequestsPerConnection = 50;
  PoolEnv env(settings);
  env.failEveryNthConnect = 13;
  unsigned warm = 400, n = scaled(1600);
  runMix(env, 0, warm, 8);
  env.settle(20 * kj::MILLISECONDS);
  size_t before = heapInUse();
  unsigned fdsBefore = openFds();
  runMix(env, warm, n, 8);
  env.settle(20 * kj::MILLISECONDS);
  size_t after = heapInUse();
  report("pool mix", n, before, after);
  unsigned fdsAfter = openFds();
  KJ_EXPECT(fdsAfter <= fdsBefore + 8, fdsBefore, fdsAfter);
  auto& s = env.pool->getStats();
  if (verbose()) {
    fprintf(stderr, "requests=%lu opened=%lu connectFailures=%lu reuses=%lu retries=%lu "
        "waits=%lu overloaded=%lu dropped=%lu open=%u idle=%u waiting=%u upstreamOpen=%u\n",
        s.requests, s.connectionsOpened, s.connectFailures, s.reuses, s.retries, s.waits,
        s.overloaded, s.dropped(), env.pool->getOpenCount(), env.pool->getIdleCount(),
        env.pool->getWaitingCount(), env.upstream.open);
  }
  KJ_EXPECT(env.pool->getWaitingCount() == 0);
  KJ_EXPECT(env.pool->getOpenCount() <= settings.maxConnections);
  KJ_EXPECT(env.pool->getIdleCount() <= settings.maxIdleConnections);
  KJ_EXPECT(after < before + 128 * 1024, before, after);
}


kj::Promise<void> oneUnderPressure(PoolEnv& env, unsigned i, kj::ArrayPtr<const kj::byte> upload) {
  // Request number `i` of a mix for a pool that is always saturated: requests that wait and time
  // out, are refused (queue full), are cancelled while waiting, stream a large upload, or find
  // their connection attempt timing out.
  unsigned kind = i % 8;
  if (kind == 0 || kind == 5) {
    // Holds a connection for a while, then gives up.
    auto r = env.pool->request(kj::HttpMethod::GET, kj::str("/hang?n=", i), env.headers());
    r.body = nullptr;
    return r.response.ignoreResult().catch_([](kj::Exception&&) {})
        .exclusiveJoin(env.timer.afterDelay(3 * kj::MILLISECONDS));
  }
  if (kind == 3) {
    // A streaming upload (larger than maxReplayBodyBytes).
    auto r = env.pool->request(kj::HttpMethod::POST, kj::str("/ok?n=", i), env.headers(),
        uint64_t(upload.size()));
    auto& body = *r.body;
    auto write = writeAll(body, upload).attach(kj::mv(r.body))
        .catch_([](kj::Exception&&) {});
    auto response = r.response.then([](kj::HttpClient::Response&& resp) {
      return readAllCounted(kj::mv(resp.body)).ignoreResult();
    }).catch_([](kj::Exception&&) {});
    return kj::joinPromises(kj::arr(kj::mv(write), kj::mv(response)));
  }
  auto r = env.pool->request(kj::HttpMethod::GET, kj::str("/ok?n=", i), env.headers());
  r.body = nullptr;
  auto response = r.response.then([](kj::HttpClient::Response&& resp) {
    return readAllCounted(kj::mv(resp.body)).ignoreResult();
  }).catch_([](kj::Exception&&) {});
  if (kind == 6) {
    // Cancelled while (most likely) waiting for a connection.
    return response.exclusiveJoin(env.timer.afterDelay(1 * kj::MILLISECONDS));
  }
  return kj::mv(response);
}

KJ_TEST("ConnectionPool: heap and counts stay flat under saturation: wait timeouts, refusals, "
    "cancelled waits, connect timeouts, streaming uploads") {
  ConnectionPool::Settings settings;
  settings.maxConnections = 3;
  settings.maxIdleConnections = 2;
  settings.maxWaiting = 6;
  settings.waitTimeout = 2 * kj::MILLISECONDS;
  settings.connectTimeout = 2 * kj::MILLISECONDS;
  settings.idleTimeout = 5 * kj::MILLISECONDS;
  PoolEnv env(settings);
  auto& addr = *env.address;
  unsigned calls = 0;
  env.pool = kj::heap<ConnectionPool>(env.timer, env.table,
      [&addr, &calls]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
    // Every 5th connection attempt never completes (the connect timeout ends it).
    if (++calls % 5 == 0) return kj::NEVER_DONE;
    return addr.connect();
  }, settings);
  auto upload = kj::heapArray<kj::byte>(100 * 1024);
  memset(upload.begin(), 'u', upload.size());
  auto run = [&](unsigned from, unsigned count) {
    for (unsigned next = from; next < from + count;) {
      kj::Vector<kj::Promise<void>> batch;
      for (unsigned j = 0; j < 12; j++) batch.add(oneUnderPressure(env, next++, upload));
      kj::joinPromises(batch.releaseAsArray()).wait(env.ws);
    }
  };
  unsigned warm = 240, n = scaled(960);
  run(0, warm);
  env.settle(20 * kj::MILLISECONDS);
  size_t before = heapInUse();
  run(warm, n);
  env.settle(20 * kj::MILLISECONDS);
  size_t after = heapInUse();
  report("pool under pressure", n, before, after);
  auto& s = env.pool->getStats();
  if (verbose()) {
    fprintf(stderr, "requests=%lu opened=%lu connectFailures=%lu waits=%lu overloaded=%lu "
        "dropped=%lu open=%u idle=%u waiting=%u upstreamOpen=%u\n", s.requests,
        s.connectionsOpened, s.connectFailures, s.waits, s.overloaded, s.dropped(),
        env.pool->getOpenCount(), env.pool->getIdleCount(), env.pool->getWaitingCount(),
        env.upstream.open);
  }
  KJ_EXPECT(s.overloaded > 0 && s.connectFailures > 0);
  KJ_EXPECT(env.pool->getWaitingCount() == 0);
  KJ_EXPECT(env.pool->getOpenCount() <= settings.maxConnections);
  KJ_EXPECT(after < before + 128 * 1024, before, after);
}

KJ_TEST("ConnectionPool: many pools created and destroyed on one event loop leave nothing behind") {
  // A proxy that makes a pool per upstream and drops it later: each pool leaves connections idle,
  // one busy and one request waiting when it is destroyed.
  Env env;
  auto cycle = [&](unsigned i) {
    ConnectionPool::Settings settings;
    settings.maxConnections = 2;
    auto pool = kj::heap<ConnectionPool>(env.timer, env.table, *env.address, settings);
    for (unsigned j = 0; j < 2; j++) {
      auto r = pool->request(kj::HttpMethod::GET, "/ok", env.headers());
      r.body = nullptr;
      auto response = r.response.wait(env.ws);
      readAllCounted(kj::mv(response.body)).wait(env.ws);
    }
    auto a = pool->request(kj::HttpMethod::GET, "/hang", env.headers());
    auto b = pool->request(kj::HttpMethod::GET, "/hang", env.headers());
    auto c = pool->request(kj::HttpMethod::GET, "/ok", env.headers());
    auto pa = a.response.eagerlyEvaluate(nullptr);
    auto pb = b.response.eagerlyEvaluate(nullptr);
    auto pc = c.response.eagerlyEvaluate(nullptr);
    env.turns();
    pool = nullptr;
    env.turns();
  };
  unsigned warm = 50, n = scaled(300);
  for (unsigned i = 0; i < warm; i++) cycle(i);
  env.settle(10 * kj::MILLISECONDS);
  size_t before = heapInUse();
  unsigned fdsBefore = openFds();
  for (unsigned i = 0; i < n; i++) cycle(i);
  env.settle(10 * kj::MILLISECONDS);
  size_t after = heapInUse();
  unsigned fdsAfter = openFds();
  report("pools created and destroyed", n, before, after);
  if (verbose()) {
    fprintf(stderr, "fds %u -> %u, upstream open %u\n", fdsBefore, fdsAfter, env.upstream.open);
  }
  KJ_EXPECT(fdsAfter <= fdsBefore + 4, fdsBefore, fdsAfter);
  KJ_EXPECT(after < before + 64 * 1024, before, after);
}

}  // namespace
}  // namespace sockfetch
