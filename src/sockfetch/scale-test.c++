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
#include <kj/timer.h>
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

// =================================================================================================
// The pool's bookkeeping at a thousand connections and a thousand waiting requests: over
// in-process pipes (no file descriptors), on a timer the test advances by hand.

class PipeUpstream {
  // Connections over in-process pipes, numbered from 0 as they are opened. Each answers every
  // request with its own number and the request's path ("7 /x"). end(n) ends connection n from
  // the server's side, as a server closing an idle connection does.
public:
  PipeUpstream(): tasks(errors) {}

  Connector connector() {
    return [this]() -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      auto pipe = kj::newTwoWayPipe();
      auto conn = kj::heap<Conn>(*this, conns.size(), kj::mv(pipe.ends[1]));
      conns.add(conn.get());
      tasks.add(serve(*conn).attach(kj::mv(conn)));
      return kj::mv(pipe.ends[0]);
    };
  }

  void end(unsigned n) {
    KJ_IF_SOME(conn, conns[n]) {
      conn.stream->shutdownWrite();
    }
  }

  unsigned open = 0;

private:
  struct Conn {
    Conn(PipeUpstream& up, unsigned id, kj::Own<kj::AsyncIoStream> stream)
        : up(up), id(id), stream(kj::mv(stream)) {
      ++up.open;
    }
    ~Conn() noexcept(false) {
      --up.open;
      up.conns[id] = nullptr;
    }
    PipeUpstream& up;
    unsigned id;
    kj::Own<kj::AsyncIoStream> stream;
    kj::Vector<char> head;
    char buffer[256];
  };
  struct Errors final: public kj::TaskSet::ErrorHandler {
    void taskFailed(kj::Exception&& e) override {
      KJ_FAIL_EXPECT("the test's upstream failed", e);
    }
  };

  kj::Vector<kj::Maybe<Conn&>> conns;
  Errors errors;
  kj::TaskSet tasks;

  kj::Promise<void> serve(Conn& c) {
    return c.stream->tryRead(c.buffer, 1, sizeof(c.buffer)).then([this, &c](size_t n)
        -> kj::Promise<void> {
      if (n == 0) return kj::READY_NOW;  // the client closed
      c.head.addAll(c.buffer, c.buffer + n);
      auto text = c.head.asPtr();
      if (text.size() < 4 || memcmp(text.end() - 4, "\r\n\r\n", 4) != 0) return serve(c);
      // "GET /path HTTP/1.1": the path is between the first two spaces.
      size_t pathStart = 0;
      while (text[pathStart] != ' ') pathStart++;
      size_t pathEnd = ++pathStart;
      while (text[pathEnd] != ' ') pathEnd++;
      auto body = kj::str(c.id, " ", text.slice(pathStart, pathEnd));
      auto reply = kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", body.size(), "\r\n\r\n", body);
      c.head.clear();
      auto& r = reply;
      return writeAll(*c.stream, r.asBytes()).attach(kj::mv(reply))
          .then([this, &c]() { return serve(c); });
    });
  }
};

struct ManyEnv {
  kj::EventLoop loop;
  kj::WaitScope ws{loop};
  kj::TimerImpl timer{kj::origin<kj::TimePoint>()};
  kj::HttpHeaderTable table;
  PipeUpstream upstream;
  kj::Own<ConnectionPool> pool;

  explicit ManyEnv(ConnectionPool::Settings settings)
      : pool(kj::heap<ConnectionPool>(timer, table, upstream.connector(), kj::mv(settings))) {}

  kj::Promise<kj::HttpClient::Response> start(kj::StringPtr path) {
    kj::HttpHeaders headers(table);
    auto request = pool->request(kj::HttpMethod::GET, path, headers);
    request.body = nullptr;
    return kj::mv(request.response);
  }

  void turns(unsigned n = 20) {
    for (unsigned i = 0; i < n; i++) kj::evalLater([]() {}).wait(ws);
  }

  kj::String read(kj::HttpClient::Response&& response) {
    KJ_ASSERT(response.statusCode == 200);
    return response.body->readAllText().wait(ws);
  }
};

unsigned connectionOf(kj::StringPtr body) {
  // The upstream's connection number, from a body "N /path".
  return strtoul(body.cStr(), nullptr, 10);
}

KJ_TEST("ConnectionPool: a thousand idle connections are reused newest first, and those the "
    "server ends or that expire together are each dropped and counted once") {
  const unsigned N = scaled(1000);
  ConnectionPool::Settings settings;
  settings.maxConnections = N;
  settings.maxIdleConnections = N;
  settings.idleTimeout = 60 * kj::SECONDS;
  ManyEnv env(settings);

  // N requests at once open N connections; their bodies, read in order, give them back in order.
  kj::Vector<kj::Promise<kj::HttpClient::Response>> responses;
  for (unsigned i = 0; i < N; i++) responses.add(env.start(kj::str("/", i)));
  kj::Vector<unsigned> idleOrder;  // connection numbers, oldest idle first
  for (auto& response: responses) {
    idleOrder.add(connectionOf(env.read(response.wait(env.ws))));
    env.timer.advanceTo(env.timer.now() + 1 * kj::MILLISECONDS);
  }
  env.turns();
  auto& stats = env.pool->getStats();
  KJ_ASSERT(stats.connectionsOpened == N && env.pool->getIdleCount() == N);

  // Ten requests at once take the ten newest.
  auto takeNewest = [&](unsigned count, kj::ArrayPtr<const unsigned> expected) {
    kj::Vector<kj::Promise<kj::HttpClient::Response>> taken;
    for (unsigned i = 0; i < count; i++) taken.add(env.start("/again"));
    kj::Vector<kj::HttpClient::Response> held;
    for (unsigned i = 0; i < count; i++) {
      held.add(taken[i].wait(env.ws));
      KJ_EXPECT(held.back().statusCode == 200);
    }
    // Read in reverse, so that they go back in the order they were taken out.
    for (unsigned i = count; i-- > 0;) {
      auto body = held[i].body->readAllText().wait(env.ws);
      KJ_EXPECT(connectionOf(body) == expected[i], i, body, expected[i]);
    }
  };
  kj::Vector<unsigned> newestTen;
  for (unsigned i = 0; i < 10; i++) newestTen.add(idleOrder[N - 1 - i]);
  takeNewest(10, newestTen);
  KJ_EXPECT(stats.connectionsOpened == N && stats.reuses == 10);

  // The server ends every other idle connection (the oldest first, ...) in one event.
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
  KJ_EXPECT(env.upstream.open == N / 2, env.upstream.open);

  // The survivors keep their order: the newest five are the newest five kept.
  kj::Vector<unsigned> newestKept;
  for (unsigned i = 0; i < 5; i++) newestKept.add(kept[kept.size() - 1 - i]);
  takeNewest(5, newestKept);
  KJ_EXPECT(stats.connectionsOpened == N);

  // All of them expire together, in one sweep.
  env.timer.advanceTo(env.timer.now() + settings.idleTimeout);
  env.turns();
  KJ_EXPECT(stats.droppedIdleTimeout == N / 2, stats.droppedIdleTimeout);
  KJ_EXPECT(stats.dropped() == N, stats.dropped());
  KJ_EXPECT(env.pool->getIdleCount() == 0 && env.pool->getOpenCount() == 0);
  KJ_EXPECT(env.upstream.open == 0, env.upstream.open);

  // And the pool works as before.
  KJ_EXPECT(env.read(env.start("/last").wait(env.ws)) == kj::str(N, " /last"));
}

KJ_TEST("ConnectionPool: a thousand waiting requests, a third of them cancelled, are served in "
    "the order they came") {
  const unsigned N = scaled(1000);
  ConnectionPool::Settings settings;
  settings.maxConnections = 1;
  settings.maxWaiting = N;
  ManyEnv env(settings);

  // The only connection stays busy until its body is read.
  auto first = env.start("/first").wait(env.ws);
  kj::Vector<unsigned> served;
  kj::Vector<kj::Maybe<kj::Promise<void>>> waiting;
  for (unsigned i = 0; i < N; i++) {
    waiting.add(env.start(kj::str("/", i)).then([&served, i](kj::HttpClient::Response&& r) {
      served.add(i);
      return r.body->readAllText().ignoreResult().attach(kj::mv(r.body));
    }).eagerlyEvaluate(nullptr));
  }
  env.turns();
  auto& stats = env.pool->getStats();
  KJ_EXPECT(env.pool->getWaitingCount() == N && stats.waits == N, env.pool->getWaitingCount());

  // One more is refused at once.
  auto refused = env.start("/refused");
  KJ_EXPECT(refused.poll(env.ws));
  KJ_EXPECT_THROW_MESSAGE("saturated", refused.wait(env.ws));

  // A third give up while they wait: from the front, the back and the middle of the queue.
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
      promise.wait(env.ws);
    }
  }
  KJ_EXPECT(served.size() == expected.size(), served.size());
  for (size_t i = 0; i < kj::min(served.size(), expected.size()); i++) {
    KJ_ASSERT(served[i] == expected[i], i, served[i], expected[i]);
  }
  KJ_EXPECT(stats.connectionsOpened == 1 && stats.reuses == expected.size(), stats.reuses);
  KJ_EXPECT(env.pool->getWaitingCount() == 0 && env.pool->getIdleCount() == 1);
}

}  // namespace
}  // namespace sockfetch
