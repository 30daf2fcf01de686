// sockfetch from many threads at once, as an embedder such as workerd uses it: one KJ event loop
// per thread (kj::Thread + kj::setupAsyncIo()), each with its own pools, fetchers and upstreams,
// nothing shared between threads but the library's process-wide and per-thread state
// (FramedStream's per-thread ProbeStarter, ResponseFramer's per-thread buffer cache, the stateless
// shared bodies). Covers: concurrent threads with idle periods, idle closes, unsolicited bytes,
// releases and sequential event loops per thread, every response byte-exact and every pool's
// stats consistent; threads that end (and start) while others go on; a shared upstream thread
// (kj::HttpServer, stopped through a cross-thread fulfiller); memory a thread's per-thread state
// holds, given back when the thread ends (counted by this binary's own operator new/delete);
// and an event loop kept in a thread_local object, torn down at thread exit after the library's
// own per-thread state. Real loopback TCP and unix sockets (plain sockets: the deferred idle read
// is in play); every wait is bounded.
//
// Failures inside a worker thread are KJ_ASSERTs: kj::Thread rethrows them when joined.

#include "pool.h"
#include "stream-fetcher.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/thread.h>
#include <kj/timer.h>
#include <atomic>
#include <condition_variable>
#include <malloc.h>
#include <mutex>
#include <new>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// =================================================================================================
// Live heap bytes, counted by this binary's operator new/delete (kj's heap, kj::Array and
// kj::Vector all allocate through them).

namespace {
std::atomic<int64_t> liveHeapBytes(0);

void* countedAlloc(size_t n) {
  void* p = malloc(n == 0 ? 1 : n);
  if (p == nullptr) throw std::bad_alloc();
  liveHeapBytes.fetch_add(malloc_usable_size(p), std::memory_order_relaxed);
  return p;
}

void countedFree(void* p) {
  if (p == nullptr) return;
  liveHeapBytes.fetch_sub(malloc_usable_size(p), std::memory_order_relaxed);
  free(p);
}
}  // namespace

void* operator new(size_t n) { return countedAlloc(n); }
void* operator new[](size_t n) { return countedAlloc(n); }
void* operator new(size_t n, const std::nothrow_t&) noexcept {
  void* p = malloc(n == 0 ? 1 : n);
  if (p != nullptr) liveHeapBytes.fetch_add(malloc_usable_size(p), std::memory_order_relaxed);
  return p;
}
void* operator new[](size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { countedFree(p); }
void operator delete[](void* p) noexcept { countedFree(p); }
void operator delete(void* p, size_t) noexcept { countedFree(p); }
void operator delete[](void* p, size_t) noexcept { countedFree(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { countedFree(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { countedFree(p); }

namespace sockfetch {
namespace {

using test::pathOf;
using test::ScriptedServer;
using Reply = ScriptedServer::Reply;
using Response = kj::HttpClient::Response;

double monotonicSeconds() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

// =================================================================================================
// Bodies: every path names its thread, event loop and request, and its body is derived from the
// path alone, so that a byte of another exchange (or another thread) shows.

size_t sizeFor(kj::StringPtr path) {
  // 0 to ~20 KB: within one framer buffer, and several times it.
  uint64_t h = 1469598103934665603ull;
  for (char c: path) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  switch (h % 4) {
    case 0: return h % 64;
    case 1: return 100 + h % 3000;
    case 2: return 4000 + h % 300;
    default: return 6000 + h % 14000;
  }
}

kj::String bodyFor(kj::StringPtr path) {
  auto size = sizeFor(path);
  auto body = kj::heapString(size);
  for (size_t i = 0; i < size; i++) body[i] = path[i % path.size()];
  return body;
}

kj::String chunked(kj::StringPtr body, bool trailer) {
  kj::Vector<char> out;
  size_t pos = 0;
  size_t step = 1;
  while (pos < body.size()) {
    size_t n = kj::min(step, body.size() - pos);
    out.addAll(kj::str(kj::hex(n), "\r\n"));
    out.addAll(body.slice(pos, pos + n));
    out.addAll("\r\n"_kj);
    pos += n;
    step = step * 3 + 7;
  }
  out.addAll(trailer ? "0\r\nX-Trailer: t\r\n\r\n"_kj : "0\r\n\r\n"_kj);
  return kj::heapString(out.begin(), out.size());
}

kj::StringPtr kindOf(kj::StringPtr path) {
  // The last path segment says how the upstream answers.
  KJ_IF_SOME(slash, path.findLast('/')) {
    return path.slice(slash + 1);
  }
  return path;
}

constexpr kj::StringPtr POISON = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"_kj;

Reply scripted(unsigned, unsigned, kj::StringPtr text) {
  // Answers by the path's kind: "cl" Content-Length, "ch" chunked, "tr" chunked with a trailer,
  // "poison" (Content-Length, then a whole unsolicited response once idle), "close"
  // (`Connection: close`, and the server closes).
  auto path = pathOf(text);
  auto kind = kindOf(path);
  auto body = bodyFor(path);
  Reply reply;
  if (kind == "ch" || kind == "tr") {
    reply.bytes = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        chunked(body, kind == "tr"));
  } else if (kind == "close") {
    reply.bytes = kj::str("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: ",
        body.size(), "\r\n\r\n", body);
    reply.closeAfter = true;
  } else {
    reply.bytes = kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", body.size(), "\r\n\r\n", body);
    if (kind == "poison") reply.thenUnsolicited = kj::str(POISON);
  }
  return reply;
}

// =================================================================================================
// One thread's client side: an event loop, a pool and a lone fetcher.

struct ThreadEnv {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::WaitScope& ws = io.waitScope;
  kj::Timer& timer = io.provider->getTimer();
  kj::HttpHeaderTable table;

  kj::HttpHeaders headers() {
    kj::HttpHeaders h(table);
    h.set(kj::HttpHeaderId::HOST, "upstream.test");
    return h;
  }

  template <typename T>
  T bounded(kj::Promise<T> promise) {
    return promise.exclusiveJoin(timer.afterDelay(5 * kj::SECONDS).then([]() -> T {
      KJ_FAIL_ASSERT("timed out: the library hung");
    })).wait(ws);
  }

  void settle(kj::Duration d) { timer.afterDelay(d).wait(ws); }

  template <typename Func>
  bool waitFor(Func&& condition, kj::Duration limit = 5 * kj::SECONDS) {
    auto deadline = timer.now() + limit;
    while (!condition() && timer.now() < deadline) {
      timer.afterDelay(1 * kj::MILLISECONDS).wait(ws);
    }
    return condition();
  }

  kj::Promise<kj::String> get(kj::HttpClient& client, kj::String url) {
    auto request = client.request(kj::HttpMethod::GET, url, headers());
    request.body = nullptr;
    return request.response.then([](Response&& response) {
      KJ_ASSERT(response.statusCode == 200, response.statusCode);
      return response.body->readAllText().attach(kj::mv(response.body));
    }).attach(kj::mv(url)).eagerlyEvaluate(nullptr);
  }
};

struct Tally {
  // What one thread did, for the main thread to check.
  uint64_t requests = 0;
  uint64_t bodyBytes = 0;
  uint64_t poisons = 0;
  uint64_t closes = 0;
  uint64_t idleClosed = 0;
  uint64_t releases = 0;
  uint64_t loops = 0;
};

void checkPool(ThreadEnv& env, ConnectionPool& pool, unsigned liveStreams) {
  // With nothing in flight: every connection opened is idle or counted once under a drop reason.
  for (int i = 0; i < 3; i++) kj::evalLater([]() {}).wait(env.ws);
  auto& s = pool.getStats();
  KJ_ASSERT(pool.getWaitingCount() == 0);
  KJ_ASSERT(pool.getOpenCount() == pool.getIdleCount(), pool.getOpenCount(), pool.getIdleCount());
  KJ_ASSERT(pool.getOpenCount() == liveStreams, pool.getOpenCount(), liveStreams);
  KJ_ASSERT(s.connectionsOpened == pool.getOpenCount() + s.dropped(), s.connectionsOpened,
      pool.getOpenCount(), s.dropped());
}

void runClientLoop(unsigned thread, unsigned loop, unsigned count, kj::StringPtr listenOn,
    Tally& tally, kj::Function<bool()> keepGoing) {
  // One event loop of a worker thread: `count` requests through a pool (batches of 1-4 at once)
  // and a lone StreamFetcher (released and re-wrapped now and then), against a scripted upstream
  // in the same loop. Then, while `keepGoing()`, idle connections are watched (the loop idles).
  ThreadEnv env;
  ScriptedServer server(env.io, listenOn, scripted);
  auto address = server.address();
  unsigned liveStreams = 0;
  ConnectionPool::Settings settings;
  settings.maxConnections = 4;
  settings.maxIdleConnections = 4;
  ConnectionPool pool(env.timer, env.table, [&]() {
    return address->connect().then([&](kj::Own<kj::AsyncIoStream>&& s) {
      ++liveStreams;
      return s.attach(kj::defer([&]() { --liveStreams; }));
    });
  }, kj::mv(settings));
  test::Rng rng(thread * 1000 + loop);
  kj::StringPtr kinds[] = {"cl", "cl", "ch", "tr", "cl", "ch"};
  uint64_t poisons = 0, closes = 0, idleClosed = 0, poolRequests = 0;
  unsigned n = 0;

  auto expect = [&](kj::StringPtr url, kj::StringPtr got) {
    auto want = bodyFor(url);
    KJ_ASSERT(got == want, "a response body is not its own", url, got.size(), want.size(),
        got.slice(0, kj::min(got.size(), size_t(40))));
    tally.bodyBytes += got.size();
  };

  while (n < count) {
    unsigned batch = 1 + rng.below(4);
    kj::Vector<kj::String> urls;
    kj::Vector<kj::Promise<kj::String>> responses;
    for (unsigned i = 0; i < batch && n < count; i++, n++) {
      auto kind = rng.chance(8) ? "close"_kj : rng.pick(kinds);
      if (kind == "close") ++closes;
      urls.add(kj::str("/t", thread, "/l", loop, "/r", n, "/", kind));
      responses.add(env.get(pool, kj::str(urls.back())));
      ++poolRequests;
    }
    for (size_t i = 0; i < urls.size(); i++) {
      expect(urls[i], env.bounded(kj::mv(responses[i])));
    }
    tally.requests += urls.size();

    switch (rng.below(8)) {
      case 0: {
        // Unsolicited bytes on an idle connection: alone, and nothing sent until the pool has
        // dropped it (a request sent before the bytes come would take them for its response, which
        // no client can tell apart).
        auto url = kj::str("/t", thread, "/l", loop, "/r", n++, "/poison");
        expect(url, env.bounded(env.get(pool, kj::str(url))));
        ++tally.requests;
        ++poolRequests;
        ++poisons;
        KJ_ASSERT(env.waitFor([&]() {
          return pool.getStats().droppedUnsolicitedBytes == poisons;
        }), "unsolicited bytes on an idle connection were not noticed while idle",
            pool.getStats().droppedUnsolicitedBytes, poisons);
        break;
      }
      case 1: {
        // The server closes every idle connection: the pool notices each while idle.
        unsigned idle = pool.getIdleCount();
        idleClosed += idle;
        server.closeIdleConnections();
        KJ_ASSERT(env.waitFor([&]() {
          return pool.getStats().droppedPeerClosedIdle == idleClosed;
        }), "idle connections closed by the server were not noticed while idle",
            pool.getStats().droppedPeerClosedIdle, idleClosed);
        break;
      }
      case 2:
        // An idle period: the thread's deferred idle reads start.
        env.settle((1 + rng.below(3)) * kj::MILLISECONDS);
        break;
      case 3: {
        // A lone fetcher on its own connection: two requests, released (with what it read
        // ahead, which is nothing), two more on a new fetcher over the released stream.
        auto stream = env.bounded(address->connect());
        auto fetcher = kj::heap<StreamFetcher>(kj::mv(stream), env.table);
        for (int i = 0; i < 4; i++) {
          ++tally.requests;
          auto url = kj::str("/t", thread, "/l", loop, "/r", n++, "/", rng.pick(kinds));
          expect(url, env.bounded(env.get(*fetcher, kj::str(url))));
          KJ_ASSERT(fetcher->getState() == StreamFetcher::State::IDLE, fetcher->getState());
          if (i == 1) {
            if (rng.chance(50)) env.settle(1 * kj::MILLISECONDS);  // its idle read may start
            auto released = fetcher->release();
            fetcher = kj::heap<StreamFetcher>(kj::mv(released), env.table);
            ++tally.releases;
          }
        }
        if (rng.chance(50)) env.settle(1 * kj::MILLISECONDS);
        break;  // destroyed idle, its idle read perhaps started
      }
      default:
        break;
    }
  }

  env.settle(10 * kj::MILLISECONDS);  // `close` connections: the server's ends close
  checkPool(env, pool, liveStreams);
  auto& s = pool.getStats();
  KJ_ASSERT(s.requests == poolRequests, s.requests, poolRequests);
  KJ_ASSERT(s.retries == 0, s.retries);
  KJ_ASSERT(s.droppedUnsolicitedBytes == poisons, s.droppedUnsolicitedBytes, poisons);
  KJ_ASSERT(s.droppedConnectionClose == closes, s.droppedConnectionClose, closes);
  KJ_ASSERT(s.droppedPeerClosedIdle == idleClosed, s.droppedPeerClosedIdle, idleClosed);
  KJ_ASSERT(s.droppedFailed == 0 && s.droppedAbandoned == 0 && s.droppedStale == 0,
      s.droppedFailed, s.droppedAbandoned, s.droppedStale);
  KJ_ASSERT(server.pipelined == 0, server.pipelined);

  // Go on watching idle connections until told to stop: other threads end and start meanwhile.
  while (keepGoing()) env.settle(2 * kj::MILLISECONDS);
  // Then, after they did: this thread's idle reads still work.
  if (pool.getIdleCount() > 0) {
    unsigned idle = pool.getIdleCount();
    idleClosed += idle;
    server.closeIdleConnections();
    KJ_ASSERT(env.waitFor([&]() {
      return pool.getStats().droppedPeerClosedIdle == idleClosed;
    }), "after other threads ended, idle connections closed by the server were not noticed",
        pool.getStats().droppedPeerClosedIdle, idleClosed);
  }
  {
    auto url = kj::str("/t", thread, "/l", loop, "/last/poison");
    expect(url, env.bounded(env.get(pool, kj::str(url))));
    ++tally.requests;
    ++poisons;
    KJ_ASSERT(env.waitFor([&]() {
      return pool.getStats().droppedUnsolicitedBytes == poisons;
    }), "after other threads ended, unsolicited bytes were not noticed while idle");
  }
  checkPool(env, pool, liveStreams);
  tally.poisons += poisons;
  tally.closes += closes;
  tally.idleClosed += idleClosed;
  ++tally.loops;
  // Leave an idle connection with its idle read due (deferral armed) when the loop goes.
  auto url = kj::str("/t", thread, "/l", loop, "/end/cl");
  expect(url, env.bounded(env.get(pool, kj::str(url))));
  ++tally.requests;
}

struct Flag {
  std::atomic<bool> set{false};
  void raise() { set.store(true); }
  bool isSet() const { return set.load(); }
};

KJ_TEST("four threads, each with its own loops, pool, fetchers and upstream, concurrently: "
    "every body byte-exact, every pool's stats consistent, idle reads working in each thread "
    "while others end and start") {
  // Thread 0 runs a short time and ends; thread 4 starts after it ended and ends too; threads 1-3
  // run two event loops in sequence each, and at the end of each watch their idle connections
  // until threads 0 and 4 are done, then check that their own idle reads still notice a close
  // and unsolicited bytes. Threads 1 and 3 listen on unix sockets, the others on TCP.
  double started = monotonicSeconds();
  constexpr unsigned THREADS = 5;
  Tally tallies[THREADS];
  Flag shortDone, lateDone;
  auto otherThreadsRunning = [&]() {
    // (Bounded: should the main thread fail before raising the flags, the workers still end.)
    return !(shortDone.isSet() && lateDone.isSet()) && monotonicSeconds() - started < 15;
  };
  auto worker = [&](unsigned t, unsigned loops, unsigned count, kj::Function<bool()> keepGoing) {
    return [&, t, loops, count, keepGoing = kj::mv(keepGoing)]() mutable {
      for (unsigned loop = 0; loop < loops; loop++) {
        // Only the last loop waits for the others: the first ends while they run.
        bool last = loop + 1 == loops;
        runClientLoop(t, loop, count, t % 2 == 1 ? "unix"_kj : "127.0.0.1"_kj, tallies[t],
            [&]() { return last && keepGoing(); });
      }
    };
  };
  {
    kj::Maybe<kj::Own<kj::Thread>> shortThread = kj::heap<kj::Thread>(
        worker(0, 1, 40, []() { return false; }));
    kj::Thread t1(worker(1, 2, 90, otherThreadsRunning));
    kj::Thread t2(worker(2, 2, 90, otherThreadsRunning));
    kj::Thread t3(worker(3, 2, 90, otherThreadsRunning));
    shortThread = nullptr;  // joins: thread 0 has ended, its event loop and per-thread state gone
    shortDone.raise();
    {
      kj::Thread late(worker(4, 1, 40, []() { return false; }));
    }
    lateDone.raise();
  }
  for (unsigned t = 0; t < THREADS; t++) {
    KJ_CONTEXT(t);
    auto& tally = tallies[t];
    unsigned loops = t == 0 || t == 4 ? 1 : 2;
    KJ_EXPECT(tally.loops == loops, tally.loops);
    KJ_EXPECT(tally.requests >= loops * (t == 0 || t == 4 ? 40 : 90), tally.requests);
    KJ_EXPECT(tally.poisons >= loops, tally.poisons);
    KJ_EXPECT(tally.bodyBytes > 0);
    KJ_EXPECT(tally.idleClosed > 0, tally.idleClosed);
    KJ_EXPECT(tally.closes > 0, tally.closes);
  }
  KJ_EXPECT(monotonicSeconds() - started < 20, monotonicSeconds() - started);
}

// =================================================================================================
// One upstream thread (kj::HttpServer) shared by client threads

class PathEcho final: public kj::HttpService {
  // Answers every request with bodyFor(its path): chunked when the path's kind is "ch", else with
  // Content-Length.
public:
  explicit PathEcho(const kj::HttpHeaderTable& table): table(table) {}

  kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url,
      const kj::HttpHeaders& headers, kj::AsyncInputStream& requestBody,
      Response& response) override {
    auto body = bodyFor(url);
    kj::HttpHeaders h(table);
    kj::Maybe<uint64_t> size = kindOf(url) == "ch" ? kj::Maybe<uint64_t>(nullptr)
                                                   : kj::Maybe<uint64_t>(body.size());
    auto stream = response.send(200, "OK", h, size);
    if (body.size() == 0) return kj::READY_NOW;
    auto write = stream->write(body.begin(), body.size());
    return write.attach(kj::mv(stream), kj::mv(body));
  }

private:
  const kj::HttpHeaderTable& table;
};

struct SharedUpstream {
  // A kj::HttpServer on 127.0.0.1 in a thread of its own, which closes connections idle for
  // 15 ms (its pipelineTimeout), until stop().
  // (std::mutex rather than kj::MutexGuarded: ThreadSanitizer understands it.)
  std::mutex mutex;
  std::condition_variable published;
  unsigned listeningPort = 0;
  kj::Maybe<kj::Own<kj::CrossThreadPromiseFulfiller<void>>> stopper;
  kj::Thread thread;

  SharedUpstream(): thread([this]() { run(); }) {
    std::unique_lock<std::mutex> lock(mutex);
    published.wait(lock, [this]() { return listeningPort != 0; });
  }
  ~SharedUpstream() noexcept(false) { stop(); }

  void stop() {
    std::unique_lock<std::mutex> lock(mutex);
    KJ_IF_SOME(f, stopper) {
      f->fulfill();
      stopper = nullptr;
    }
  }

  unsigned port() {
    std::unique_lock<std::mutex> lock(mutex);
    return listeningPort;
  }

  void run() {
    auto io = kj::setupAsyncIo();
    kj::HttpHeaderTable table;
    PathEcho service(table);
    auto listener = io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope)
        ->listen();
    kj::HttpServerSettings settings;
    settings.pipelineTimeout = 15 * kj::MILLISECONDS;
    kj::HttpServer server(io.provider->getTimer(), table, service, settings);
    auto listening = server.listenHttp(*listener);
    auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
    {
      std::unique_lock<std::mutex> lock(mutex);
      listeningPort = listener->getPort();
      stopper = kj::mv(paf.fulfiller);
    }
    published.notify_all();
    paf.promise.exclusiveJoin(kj::mv(listening)).wait(io.waitScope);
  }
};

void runSharedUpstreamClient(unsigned thread, unsigned port, unsigned count,
    uint64_t& noticedIdleCloses) {
  // A pool and a lone fetcher against the shared upstream, with idle periods longer than its
  // pipelineTimeout now and then: it closes the idle connections, and the pool notices.
  ThreadEnv env;
  auto address = env.io.provider->getNetwork().parseAddress("127.0.0.1", port).wait(env.ws);
  ConnectionPool::Settings settings;
  settings.maxConnections = 3;
  ConnectionPool pool(env.timer, env.table, *address, kj::mv(settings));
  auto lone = kj::heap<StreamFetcher>(env.bounded(address->connect()), env.table);
  test::Rng rng(thread + 77);
  kj::StringPtr kinds[] = {"cl", "ch", "cl"};
  uint64_t poolRequests = 0;
  unsigned n = 0;
  while (n < count) {
    unsigned batch = 1 + rng.below(3);
    kj::Vector<kj::String> urls;
    kj::Vector<kj::Promise<kj::String>> responses;
    for (unsigned i = 0; i < batch; i++, n++) {
      urls.add(kj::str("/s", thread, "/r", n, "/", rng.pick(kinds)));
      responses.add(env.get(pool, kj::str(urls.back())));
      ++poolRequests;
    }
    for (size_t i = 0; i < urls.size(); i++) {
      auto got = env.bounded(kj::mv(responses[i]));
      KJ_ASSERT(got == bodyFor(urls[i]), "a response body is not its own", urls[i]);
    }
    {
      // The body of a request without one is one stateless object for the whole process: every
      // thread writes to it at once, and each gets its own refusal.
      auto url = kj::str("/s", thread, "/nobody", n, "/cl");
      auto request = pool.request(kj::HttpMethod::GET, url, env.headers());
      ++poolRequests;
      auto refused = request.body->write("x", 1).then([]() -> kj::String {
        KJ_FAIL_ASSERT("writing to the body of a request without one succeeded");
      }, [](kj::Exception&& e) { return kj::str(e.getDescription()); });
      auto why = env.bounded(kj::mv(refused));
      KJ_ASSERT(test::contains(why, "pass expectedBodySize"), why);
      request.body = nullptr;
      auto response = env.bounded(kj::mv(request.response));
      KJ_ASSERT(env.bounded(response.body->readAllText()) == bodyFor(url), url);
    }
    if (lone->getState() == StreamFetcher::State::CLOSED) {
      KJ_ASSERT(lone->getCloseKind() == StreamFetcher::CloseKind::PEER_CLOSED_IDLE,
          lone->getCloseKind(), lone->getCloseReason().orDefault(""));
      lone = kj::heap<StreamFetcher>(env.bounded(address->connect()), env.table);
    }
    auto url = kj::str("/s", thread, "/lone", n, "/", rng.pick(kinds));
    auto got = env.bounded(kj::evalNow([&]() { return env.get(*lone, kj::str(url)); })
        .then([](kj::String&& s) {
      return kj::Maybe<kj::String>(kj::mv(s));
    }, [&](kj::Exception&& e) -> kj::Maybe<kj::String> {
      // The server's idle close may cross the request (the keep-alive race, which a lone
      // fetcher does not retry), or be noticed just before it (request() then throws at once):
      // either way nothing of a response came, and the fetcher is closed.
      KJ_ASSERT(!lone->lastExchangeReceivedResponse(), e);
      KJ_ASSERT(lone->getState() == StreamFetcher::State::CLOSED, lone->getState(), e);
      return nullptr;
    }));
    if (got == nullptr) {
      lone = kj::heap<StreamFetcher>(env.bounded(address->connect()), env.table);
      got = env.bounded(env.get(*lone, kj::str(url)));
    }
    KJ_ASSERT(KJ_ASSERT_NONNULL(got) == bodyFor(url), url);
    if (rng.chance(10)) {
      // Longer than the server's pipelineTimeout: it closes every idle connection, and the pool
      // and the lone fetcher notice while idle.
      unsigned before = pool.getStats().droppedPeerClosedIdle;
      unsigned idle = pool.getIdleCount();
      KJ_ASSERT(env.waitFor([&]() {
        return pool.getIdleCount() == 0 && lone->getState() == StreamFetcher::State::CLOSED;
      }), "idle connections the server closed were not noticed while idle",
          pool.getIdleCount(), lone->getState());
      KJ_ASSERT(pool.getStats().droppedPeerClosedIdle == before + idle,
          pool.getStats().droppedPeerClosedIdle, before, idle);
      noticedIdleCloses += idle;
    }
  }
  for (int i = 0; i < 3; i++) kj::evalLater([]() {}).wait(env.ws);
  auto& s = pool.getStats();
  KJ_ASSERT(s.requests == poolRequests, s.requests, poolRequests);
  KJ_ASSERT(pool.getOpenCount() == pool.getIdleCount() && pool.getWaitingCount() == 0);
  KJ_ASSERT(s.connectionsOpened == pool.getOpenCount() + s.dropped(), s.connectionsOpened,
      pool.getOpenCount(), s.dropped());
  // A request may meet the server's close of an idle connection (found closed as the request
  // starts, or the keep-alive race): then it is retried once; never a failure.
  KJ_ASSERT(s.droppedFailed == 0 && s.droppedAbandoned == 0, s.droppedFailed, s.droppedAbandoned);
  KJ_ASSERT(s.retries <= s.droppedStale + s.droppedPeerClosedIdle, s.retries, s.droppedStale,
      s.droppedPeerClosedIdle);
}

KJ_TEST("three client threads against one upstream thread (kj::HttpServer closing idle "
    "connections): byte-exact bodies, idle closes noticed in every thread") {
  double started = monotonicSeconds();
  SharedUpstream upstream;
  auto port = upstream.port();
  constexpr unsigned THREADS = 3;
  uint64_t noticed[THREADS] = {};
  {
    kj::Vector<kj::Own<kj::Thread>> clients;
    for (unsigned t = 0; t < THREADS; t++) {
      clients.add(kj::heap<kj::Thread>([&noticed, t, port]() {
        runSharedUpstreamClient(t, port, 150, noticed[t]);
      }));
    }
  }
  upstream.stop();
  for (unsigned t = 0; t < THREADS; t++) KJ_EXPECT(noticed[t] > 0, t);
  KJ_EXPECT(monotonicSeconds() - started < 20, monotonicSeconds() - started);
}

// =================================================================================================
// Per-thread state and the memory it holds

int64_t runWarmThread(unsigned concurrent) {
  // A thread with one event loop that runs `concurrent` exchanges at once (each framer then frees
  // its 4 KiB buffer into the thread's cache), a few times, and destroys everything of the loop.
  // Returns how many heap bytes the thread still held then (its per-thread state).
  int64_t held = 0;
  {
    kj::Thread thread([&]() {
      int64_t before = liveHeapBytes.load();
      {
        ThreadEnv env;
        ScriptedServer server(env.io, "127.0.0.1", [](unsigned, unsigned, kj::StringPtr text) {
          auto reply = test::ok(pathOf(text));
          reply.delay = 2 * kj::MILLISECONDS;  // all `concurrent` in flight together
          return reply;
        });
        auto address = server.address();
        ConnectionPool::Settings settings;
        settings.maxConnections = concurrent;
        ConnectionPool pool(env.timer, env.table, *address, kj::mv(settings));
        for (int round = 0; round < 3; round++) {
          kj::Vector<kj::Promise<kj::String>> all;
          for (unsigned i = 0; i < concurrent; i++) all.add(env.get(pool, kj::str("/", i)));
          for (unsigned i = 0; i < concurrent; i++) {
            KJ_ASSERT(env.bounded(kj::mv(all[i])) == kj::str("/", i));
          }
          env.settle(2 * kj::MILLISECONDS);  // idle: the deferred idle reads start
        }
      }
      held = liveHeapBytes.load() - before;
    });
  }  // joined: `held` is set
  return held;
}

KJ_TEST("a thread's per-thread state (buffer cache, idle-read starter) is given back when the "
    "thread ends, and never shared: many short threads leave the heap as it was") {
  // Within a thread, once its event loop is gone, the framers' buffer cache still holds buffers
  // (up to 16 of 4 KiB): per-thread memory, for the thread's next exchange. When the thread ends
  // it is freed; nothing of it is left behind, however many threads come and go.
  runWarmThread(8);  // first use of process-wide statics
  int64_t heldByThread = runWarmThread(8);  // alone, so that its count is its own
  KJ_EXPECT(heldByThread >= 8 * 4096, "the buffer cache is not per-thread memory as assumed",
      heldByThread);
  int64_t before = liveHeapBytes.load();
  for (int i = 0; i < 4; i++) {
    // Two at once, so that threads' lifetimes overlap.
    kj::Thread t1([&]() { runWarmThread(8); });
    kj::Thread t2([&]() { runWarmThread(12); });
  }
  int64_t after = liveHeapBytes.load();
  KJ_EXPECT(after - before < 4096, "threads that ended left heap memory behind", after - before);
}

// A thread whose event loop (and pool) live in a thread_local object, as some embedders keep one
// per thread: it is destroyed at thread exit, after the library's own thread_local state, which
// it first used after it was made.

std::atomic<bool> holderDrained(false);  // the last holder finished its response at thread exit

struct LoopHolder {
  ThreadEnv env;
  ScriptedServer server;
  kj::Own<kj::NetworkAddress> address;
  kj::Own<ConnectionPool> pool;
  kj::Maybe<kj::Promise<kj::String>> pending;
  kj::String pendingUrl;

  LoopHolder()
      : server(env.io, "127.0.0.1", [](unsigned, unsigned, kj::StringPtr text) {
          auto path = pathOf(text);
          auto reply = test::ok(path);
          if (path.startsWith("/slow")) reply.delay = 10 * kj::MILLISECONDS;
          return reply;
        }),
        address(server.address()),
        pool(kj::heap<ConnectionPool>(env.timer, env.table, *address)) {}

  ~LoopHolder() noexcept(false) {
    // A graceful end: the response still in flight is read to its end before the loop goes.
    KJ_IF_SOME(p, pending) {
      holderDrained.store(env.bounded(kj::mv(p)) == pendingUrl);
      pending = nullptr;
    }
    pool = nullptr;
  }
};

thread_local kj::Own<LoopHolder> holder;

int64_t heldAfterThreadWithHolder(bool drainAtExit, bool& drained) {
  // Runs a thread that keeps its loop in `holder`, leaves idle connections (their idle reads due
  // or started) and, if `drainAtExit`, a response in flight for the holder's destructor to finish.
  // Returns the heap bytes left once the thread was joined.
  int64_t before = liveHeapBytes.load();
  holderDrained.store(false);
  {
    kj::Thread thread([&]() {
      holder = kj::heap<LoopHolder>();
      auto& h = *holder;
      kj::Vector<kj::Promise<kj::String>> all;
      for (unsigned i = 0; i < 4; i++) all.add(h.env.get(*h.pool, kj::str("/", i)));
      for (unsigned i = 0; i < 4; i++) KJ_ASSERT(h.env.bounded(kj::mv(all[i])) == kj::str("/", i));
      // The buffer cache is made now, after `holder`: it goes first at thread exit.
      if (drainAtExit) {
        h.pendingUrl = kj::str("/slow");
        h.pending = h.env.get(*h.pool, kj::str(h.pendingUrl));
        h.env.settle(1 * kj::MILLISECONDS);  // the request is written; the answer comes later
      }
    });
  }
  drained = holderDrained.load();
  return liveHeapBytes.load() - before;
}

KJ_TEST("an event loop and pool kept in a thread_local object, destroyed at thread exit after "
    "the library's per-thread state, with idle connections (idle reads due): nothing leaks") {
  bool drained = false;
  heldAfterThreadWithHolder(false, drained);  // first use of process-wide statics
  int64_t left = heldAfterThreadWithHolder(false, drained);
  KJ_EXPECT(left < 1024, "a thread that kept its loop in a thread_local left memory behind", left);
}

KJ_TEST("a response finished by a thread_local's destructor, after the library's thread_local "
    "buffer cache was destroyed, leaves nothing behind") {
  // A thread keeps its event loop in a thread_local object and, when that object is destroyed at
  // thread exit, finishes a response in flight; ResponseFramer's per-thread buffer cache was first
  // used after that object was made, so it is destroyed first. The framer then frees its buffer
  // itself rather than into the destroyed cache, and the thread leaves no memory behind.
  bool drained = false;
  heldAfterThreadWithHolder(true, drained);  // first use of process-wide statics
  int64_t left = heldAfterThreadWithHolder(true, drained);
  KJ_ASSERT(drained, "the holder did not finish its response at thread exit");
  KJ_EXPECT(left < 1024, "memory left behind by a thread whose thread_local loop finished a "
      "response at thread exit", left);
}

}  // namespace
}  // namespace sockfetch
