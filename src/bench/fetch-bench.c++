// fetch-bench: what safe reuse costs, measured against raw kj-http in the same run.
//
// Run it through run-fetch-bench.sh (`bazel run -c opt //src/bench:fetch-bench`), which starts a
// local nginx and passes its port. Modes, each doing the same GETs with bodies read to their end:
//   (a) raw kj::newHttpClient(table, stream) reused over one connection  (the baseline)
//   (b) sockfetch::StreamFetcher over one connection
//   (c) a new TCP connection and kj client per request
//   (d) sockfetch::ConnectionPool, 32 requests in flight
//   (e) kj's pooled client kj::newHttpClient(timer, table, address), 32 requests in flight
// and three that take the gaps apart (no target; see README.md):
//   (f) as (a), but a new kj client per request over the same connection, as StreamFetcher does
//   (g) 32 connections, each reused by one worker with a new kj client per request, 32 in flight
//   (h) as (g), but each connection keeps one kj client
// Modes are interleaved, round after round; each mode's figure is its median round, each ratio the
// median of the rounds' own ratios (printed with their range, which shows the noise). Then the heap
// bytes per idle pooled connection (glibc's mallinfo2 delta over N idle connections).

#include <sockfetch/kj-compat.h>
#include <sockfetch/pool.h>
#include <sockfetch/stream-fetcher.h>

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/debug.h>
#include <kj/main.h>
#include <kj/vector.h>
#include <malloc.h>
#include <algorithm>
#include <cmath>
#include <dirent.h>

namespace sockfetch {
namespace {

using kj::uint;

kj::byte drainBuffer[65536];
size_t expectedBodySize = 0;  // of the path being benchmarked; every body is checked against it

kj::Promise<void> drainLoop(kj::AsyncInputStream& body, size_t soFar) {
  return body.tryRead(drainBuffer, 1, sizeof(drainBuffer)).then([&body, soFar](size_t n) {
    if (n == 0) {
      // A body cut short must fail the run, never make a mode look fast.
      KJ_REQUIRE(soFar == expectedBodySize, "response body of unexpected size", soFar,
          expectedBodySize);
      return kj::Promise<void>(kj::READY_NOW);
    }
    return drainLoop(body, soFar + n);
  });
}

kj::Promise<void> drain(kj::Own<kj::AsyncInputStream> body) {
  auto& ref = *body;
  return drainLoop(ref, 0).attach(kj::mv(body));
}

double nowMicros() {
  return (kj::systemPreciseMonotonicClock().now() - kj::origin<kj::TimePoint>()) /
      kj::MICROSECONDS;
}

struct Run {
  double requestsPerSecond;
  kj::Vector<double> latencies;  // microseconds
};

double percentile(kj::Vector<double>& values, double p) {
  if (values.size() == 0) return 0;
  std::sort(values.begin(), values.end());
  // Nearest rank: the ceil(p * n)-th smallest value.
  size_t rank = size_t(std::ceil(p * values.size()));
  size_t index = kj::min(values.size() - 1, rank == 0 ? 0 : rank - 1);
  return values[index];
}

class FetchBench {
public:
  explicit FetchBench(kj::ProcessContext& context): context(context) {}

  kj::MainFunc getMain() {
    return kj::MainBuilder(context, "sockfetch fetch-bench",
        "Benchmarks StreamFetcher and ConnectionPool against raw kj-http and kj's pooled client, "
        "in one run, against an upstream on 127.0.0.1:PORT serving /small (13 bytes) and /big "
        "(64 KiB). Use run-fetch-bench.sh (bazel run -c opt //src/bench:fetch-bench), which "
        "starts nginx.")
        .addOptionWithArg({"port"}, KJ_BIND_METHOD(*this, setPort), "<port>",
            "Upstream port on 127.0.0.1 (required).")
        .addOptionWithArg({"requests"}, KJ_BIND_METHOD(*this, setRequests), "<n>",
            "Requests per mode per round (default 5000; the 64 KiB variant does a quarter).")
        .addOptionWithArg({"rounds"}, KJ_BIND_METHOD(*this, setRounds), "<n>",
            "Rounds; modes are interleaved within each (default 21).")
        .addOptionWithArg({"idle"}, KJ_BIND_METHOD(*this, setIdle), "<n>",
            "Idle connections for the memory measurement (default 1000; 0 skips it).")
        .addOptionWithArg({"modes"}, KJ_BIND_METHOD(*this, setModes), "<letters>",
            "Which modes to run, e.g. \"ab\" (default abcdefgh). Ratios need both of their modes.")
        .addOption({"small-only"}, [this]() { smallOnly = true; return true; },
            "Skip the 64 KiB variant.")
        .callAfterParsing(KJ_BIND_METHOD(*this, run))
        .build();
  }

private:
  kj::ProcessContext& context;
  uint port = 0;
  uint requests = 5000;
  uint rounds = 21;
  uint idleConnections = 1000;
  static constexpr uint MODES = 8;
  bool enabled[MODES] = {true, true, true, true, true, true, true, true};
  bool smallOnly = false;
  static constexpr uint CONCURRENCY = 32;

  kj::MainBuilder::Validity parseUint(kj::StringPtr arg, uint& out) {
    if (kj::runCatchingExceptions([&]() { out = arg.parseAs<uint>(); }) != sockfetch::none) {
      return "expected a whole number";
    }
    if (out == 0) return "must be at least 1";
    return true;
  }
  kj::MainBuilder::Validity setPort(kj::StringPtr arg) { return parseUint(arg, port); }
  kj::MainBuilder::Validity setRequests(kj::StringPtr arg) { return parseUint(arg, requests); }
  kj::MainBuilder::Validity setRounds(kj::StringPtr arg) { return parseUint(arg, rounds); }
  kj::MainBuilder::Validity setIdle(kj::StringPtr arg) {
    auto failure = kj::runCatchingExceptions([&]() { idleConnections = arg.parseAs<uint>(); });
    if (failure != sockfetch::none) {
      return "expected a whole number";
    }
    return true;
  }
  kj::MainBuilder::Validity setModes(kj::StringPtr arg) {
    for (auto& on: enabled) on = false;
    for (char c: arg) {
      if (c < 'a' || c >= 'a' + MODES) return "modes are letters a to h";
      enabled[c - 'a'] = true;
    }
    return true;
  }

  struct Io {
    kj::AsyncIoContext io = kj::setupAsyncIo();
    kj::HttpHeaderTable table;
    kj::Own<kj::NetworkAddress> address;
  };

  Run sequential(Io& env, kj::HttpClient& client, kj::StringPtr path, uint n) {
    return sequential(env, path, n, [&client]() { return kj::Own<kj::HttpClient>(&client,
        kj::NullDisposer::instance); });
  }

  template <typename NewClient>
  Run sequential(Io& env, kj::StringPtr path, uint n, NewClient&& newClient) {
    // `newClient()` is called before each request; the client it returns is dropped after the
    // response body was read to its end.
    kj::HttpHeaders headers(env.table);
    headers.set(kj::HttpHeaderId::HOST, "127.0.0.1");
    Run run;
    run.latencies.reserve(n);
    double start = nowMicros();
    for (uint i = 0; i < n; i++) {
      double t0 = nowMicros();
      auto client = newClient();
      auto request = client->request(kj::HttpMethod::GET, path, headers);
      request.body = nullptr;
      auto response = request.response.wait(env.io.waitScope);
      KJ_REQUIRE(response.statusCode == 200, response.statusCode);
      drain(kj::mv(response.body)).wait(env.io.waitScope);
      run.latencies.add(nowMicros() - t0);
    }
    run.requestsPerSecond = n / ((nowMicros() - start) / 1e6);
    return run;
  }

  Run newConnectionEach(Io& env, kj::StringPtr path, uint n) {
    kj::HttpHeaders headers(env.table);
    headers.set(kj::HttpHeaderId::HOST, "127.0.0.1");
    Run run;
    run.latencies.reserve(n);
    double start = nowMicros();
    for (uint i = 0; i < n; i++) {
      double t0 = nowMicros();
      auto stream = env.address->connect().wait(env.io.waitScope);
      auto client = kj::newHttpClient(env.table, *stream);
      auto request = client->request(kj::HttpMethod::GET, path, headers);
      request.body = nullptr;
      auto response = request.response.wait(env.io.waitScope);
      KJ_REQUIRE(response.statusCode == 200, response.statusCode);
      drain(kj::mv(response.body)).wait(env.io.waitScope);
      run.latencies.add(nowMicros() - t0);
    }
    run.requestsPerSecond = n / ((nowMicros() - start) / 1e6);
    return run;
  }

  struct Shared {
    // What the workers of one concurrent run share.
    const kj::HttpHeaders& headers;
    kj::StringPtr path;
    uint remaining;
    kj::Vector<double>& latencies;
  };

  static kj::Promise<void> worker(kj::HttpClient& client, Shared& shared) {
    if (shared.remaining == 0) return kj::READY_NOW;
    --shared.remaining;
    double t0 = nowMicros();
    auto request = client.request(kj::HttpMethod::GET, shared.path, shared.headers);
    request.body = nullptr;
    return request.response.then([](kj::HttpClient::Response&& response) {
      KJ_REQUIRE(response.statusCode == 200, response.statusCode);
      return drain(kj::mv(response.body));
    }).then([&client, &shared, t0]() {
      shared.latencies.add(nowMicros() - t0);
      return worker(client, shared);
    });
  }

  Run concurrent(Io& env, kj::HttpClient& client, kj::StringPtr path, uint n) {
    kj::HttpHeaders headers(env.table);
    headers.set(kj::HttpHeaderId::HOST, "127.0.0.1");
    Run run;
    run.latencies.reserve(n);
    Shared shared{headers, path, n, run.latencies};
    double start = nowMicros();
    kj::Vector<kj::Promise<void>> workers;
    for (uint i = 0; i < CONCURRENCY; i++) workers.add(worker(client, shared));
    kj::joinPromises(workers.releaseAsArray()).wait(env.io.waitScope);
    run.requestsPerSecond = n / ((nowMicros() - start) / 1e6);
    return run;
  }

  struct OwnConnection {
    // A worker of (g) and (h): one connection of its own, reused for every request it makes,
    // with a new kj client per request (g) or one kept client (h).
    Shared& shared;
    kj::Own<kj::AsyncIoStream> stream;
    kj::Own<kj::HttpClient> kept;
  };

  static kj::Promise<void> ownConnectionWorker(OwnConnection& self, kj::HttpHeaderTable& table) {
    auto& shared = self.shared;
    if (shared.remaining == 0) return kj::READY_NOW;
    --shared.remaining;
    double t0 = nowMicros();
    kj::Own<kj::HttpClient> perRequest;
    if (self.kept.get() == nullptr) perRequest = kj::newHttpClient(table, *self.stream);
    auto& client = self.kept.get() == nullptr ? *perRequest : *self.kept;
    auto request = client.request(kj::HttpMethod::GET, shared.path, shared.headers);
    request.body = nullptr;
    return request.response.then([](kj::HttpClient::Response&& response) {
      KJ_REQUIRE(response.statusCode == 200, response.statusCode);
      return drain(kj::mv(response.body));
    }).then([&self, &table, t0, client = kj::mv(perRequest)]() mutable {
      client = nullptr;  // before the next request, as StreamFetcher does
      self.shared.latencies.add(nowMicros() - t0);
      return ownConnectionWorker(self, table);
    });
  }

  Run ownConnections(Io& env, kj::StringPtr path, uint n, bool clientPerRequest) {
    kj::HttpHeaders headers(env.table);
    headers.set(kj::HttpHeaderId::HOST, "127.0.0.1");
    Run run;
    run.latencies.reserve(n);
    Shared shared{headers, path, n, run.latencies};
    kj::Vector<OwnConnection> workers;
    workers.reserve(CONCURRENCY);
    for (uint i = 0; i < CONCURRENCY; i++) {
      auto stream = env.address->connect().wait(env.io.waitScope);
      kj::Own<kj::HttpClient> kept;
      if (!clientPerRequest) kept = kj::newHttpClient(env.table, *stream);
      workers.add(OwnConnection{shared, kj::mv(stream), kj::mv(kept)});
    }
    // The clock starts once the fixed connections are open (32 connects one after another took
    // about 0.7 ms, 1-2 % of a round, which (d) and (e) overlap with their first requests).
    double start = nowMicros();
    kj::Vector<kj::Promise<void>> done;
    for (auto& worker: workers) done.add(ownConnectionWorker(worker, env.table));
    kj::joinPromises(done.releaseAsArray()).wait(env.io.waitScope);
    run.requestsPerSecond = n / ((nowMicros() - start) / 1e6);
    return run;
  }

  struct ModeResult {
    kj::StringPtr name;
    kj::Vector<double> rates;
    kj::Vector<double> latencies;
    double median() {
      auto sorted = kj::heapArray<double>(rates.asPtr());
      std::sort(sorted.begin(), sorted.end());
      size_t m = sorted.size() / 2;
      return sorted.size() % 2 == 1 ? sorted[m] : (sorted[m - 1] + sorted[m]) / 2;
    }
  };

  void benchBody(Io& env, kj::StringPtr path, uint n, size_t bodySize) {
    expectedBodySize = bodySize;
    ModeResult modes[MODES] = {
      {"(a) kj client, one connection"_kj, {}, {}},
      {"(b) StreamFetcher, one connection"_kj, {}, {}},
      {"(c) new connection per request"_kj, {}, {}},
      {"(d) ConnectionPool, 32 in flight"_kj, {}, {}},
      {"(e) kj pooled client, 32 in flight"_kj, {}, {}},
      {"(f) kj client per request, one conn"_kj, {}, {}},
      {"(g) kj client per request, 32 conns"_kj, {}, {}},
      {"(h) kj client per conn, 32 conns"_kj, {}, {}},
    };
    auto& timer = env.io.provider->getTimer();
    auto record = [](ModeResult& mode, Run&& run) {
      mode.rates.add(run.requestsPerSecond);
      mode.latencies.addAll(run.latencies);
    };
    auto runMode = [&](uint mode) {
      switch (mode) {
        case 0: {
          auto stream = env.address->connect().wait(env.io.waitScope);
          auto client = kj::newHttpClient(env.table, *stream);
          record(modes[0], sequential(env, *client, path, n));
          break;
        }
        case 1: {
          StreamFetcher fetcher(env.address->connect().wait(env.io.waitScope), env.table);
          record(modes[1], sequential(env, fetcher, path, n));
          KJ_REQUIRE(fetcher.getCompletedRequests() == n, "the connection was not reused",
              fetcher.getCloseReason().orDefault("?"));
          break;
        }
        case 2:
          // A new connection per request is slower; a quarter of the requests is enough.
          record(modes[2], newConnectionEach(env, path, kj::max(n / 4, 1u)));
          break;
        case 3: {
          ConnectionPool::Settings settings;
          settings.maxConnections = CONCURRENCY;
          ConnectionPool pool(timer, env.table, *env.address, settings);
          record(modes[3], concurrent(env, pool, path, n));
          auto& stats = pool.getStats();
          KJ_REQUIRE(stats.requests == n && stats.retries == 0 && stats.connectFailures == 0 &&
              stats.connectionsOpened <= CONCURRENCY && stats.droppedStale == 0 &&
              stats.droppedFailed == 0 && stats.droppedNotReusable == 0 &&
              stats.droppedAbandoned == 0 && stats.droppedConnectionClose == 0,
              "the pool did not serve every request cleanly", stats.requests, stats.retries,
              stats.connectionsOpened, stats.droppedFailed);
          break;
        }
        case 4: {
          auto client = kj::newHttpClient(timer, env.table, *env.address);
          record(modes[4], concurrent(env, *client, path, n));
          break;
        }
        case 5: {
          // Safe with nginx here only because its responses are Content-Length framed and
          // nothing follows them: a new kj client loses whatever the previous one read ahead.
          auto stream = env.address->connect().wait(env.io.waitScope);
          record(modes[5], sequential(env, path, n, [&]() {
            return kj::newHttpClient(env.table, *stream);
          }));
          break;
        }
        case 6:
          record(modes[6], ownConnections(env, path, n, true));
          break;
        case 7:
          record(modes[7], ownConnections(env, path, n, false));
          break;
      }
    };
    for (uint round = 0; round < rounds; round++) {
      // Every other round runs the modes in reverse, so that a drift in the machine's speed
      // during a round does not favour the modes that run first.
      for (uint i = 0; i < MODES; i++) {
        uint mode = round % 2 == 0 ? i : MODES - 1 - i;
        if (enabled[mode]) runMode(mode);
      }
    }
    context.warning(kj::str("\nbody ", path, ": ", n, " requests per mode per round (mode c: ",
        kj::max(n / 4, 1u), "), ", rounds,
        " rounds (every other one in reverse order), median round"));
    context.warning(kj::str("  mode                                   req/s     p50 us    p99 us"));
    double rate[MODES];
    for (uint i = 0; i < MODES; i++) {
      if (!enabled[i]) {
        rate[i] = 0;
        continue;
      }
      rate[i] = modes[i].median();
      auto p50 = percentile(modes[i].latencies, 0.50);
      auto p99 = percentile(modes[i].latencies, 0.99);
      context.warning(kj::str("  ", pad(modes[i].name, 36), pad(kj::str(uint(rate[i])), 10, true),
          pad(kj::str(uint(p50)), 10, true), pad(kj::str(uint(p99)), 10, true)));
    }
    if (enabled[0] && enabled[1]) {
      ratio("b/a (StreamFetcher vs raw kj client)", modes[1], modes[0], 0.95);
    }
    if (enabled[1] && enabled[2]) ratio("b/c (reuse vs new connection)", modes[1], modes[2], 2.0);
    if (enabled[3] && enabled[4]) {
      ratio("d/e (ConnectionPool vs kj pool)", modes[3], modes[4], 1.0);
    }
    // What the design's kj client per request costs by itself, and what the guard and the pool
    // cost beyond it. No targets: these explain the ratios above.
    auto explain = [&](kj::StringPtr name, uint x, uint y) {
      if (enabled[x] && enabled[y]) ratio(name, modes[x], modes[y]);
    };
    explain("f/a (kj client per request, sequential)", 5, 0);
    explain("b/f (StreamFetcher vs kj client per request)", 1, 5);
    explain("g/h (kj client per request, 32 in flight)", 6, 7);
    explain("d/g (ConnectionPool vs g)", 3, 6);
    explain("h/e (32 fixed connections vs kj pool)", 7, 4);
  }

  static kj::String pad(kj::StringPtr text, size_t width, bool right = false) {
    if (text.size() >= width) return kj::heapString(text);
    auto spaces = kj::repeat(' ', width - text.size());
    return right ? kj::str(spaces, text) : kj::str(text, spaces);
  }

  void ratio(kj::StringPtr name, ModeResult& x, ModeResult& y, double target = 0) {
    // `target` 0: an explanatory ratio, printed without a verdict.
    // The median of the rounds' own ratios (each round's two figures were measured minutes
    // apart at most, under the same load), and their range.
    kj::Vector<double> ratios;
    for (uint i = 0; i < x.rates.size(); i++) ratios.add(x.rates[i] / y.rates[i]);
    std::sort(ratios.begin(), ratios.end());
    size_t m = ratios.size() / 2;
    double value = ratios.size() % 2 == 1 ? ratios[m] : (ratios[m - 1] + ratios[m]) / 2;
    char text[96];
    snprintf(text, sizeof(text), "%.3f  (rounds %.3f-%.3f)", value, ratios.front(),
        ratios.back());
    if (target == 0) {
      context.warning(kj::str("  ratio ", pad(name, 46), text));
    } else {
      context.warning(kj::str("  ratio ", pad(name, 46), text, "  target >= ", target, ": ",
          value >= target ? "met" : "MISSED"));
    }
  }

  static uint openDescriptors() {
    // Called after heapInUse(): opendir() allocates.
    uint count = 0;
    DIR* dir = opendir("/proc/self/fd");
    KJ_REQUIRE(dir != nullptr);
    while (readdir(dir) != nullptr) ++count;
    closedir(dir);
    return count;
  }

  static long heapInUse() {
    auto info = mallinfo2();
    return long(info.uordblks + info.hblkhd);
  }

  void benchIdleMemory(Io& env) {
    kj::HttpHeaders headers(env.table);
    headers.set(kj::HttpHeaderId::HOST, "127.0.0.1");
    auto& timer = env.io.provider->getTimer();
    uint n = idleConnections;
    auto fill = [&](kj::HttpClient& client) {
      // n requests at once, so that n connections open; then all of them go idle.
      kj::Vector<kj::Promise<void>> all;
      for (uint i = 0; i < n; i++) {
        auto request = client.request(kj::HttpMethod::GET, "/small", headers);
        request.body = nullptr;
        all.add(request.response.then([](kj::HttpClient::Response&& response) {
          return drain(kj::mv(response.body));
        }));
      }
      kj::joinPromises(all.releaseAsArray()).wait(env.io.waitScope);
      timer.afterDelay(20 * kj::MILLISECONDS).wait(env.io.waitScope);
    };

    expectedBodySize = 13;
    long ours;
    {
      malloc_trim(0);
      long before = heapInUse();
      uint fdsBefore = openDescriptors();
      ConnectionPool::Settings settings;
      settings.maxConnections = n;
      settings.maxIdleConnections = n;
      ConnectionPool pool(timer, env.table, *env.address, settings);
      fill(pool);
      KJ_REQUIRE(pool.getIdleCount() == n, pool.getIdleCount(), pool.getStats().droppedFailed);
      ours = (heapInUse() - before) / long(n);
      KJ_REQUIRE(openDescriptors() - fdsBefore == n, openDescriptors() - fdsBefore);
    }
    long kjPool;
    {
      malloc_trim(0);
      long before = heapInUse();
      uint fdsBefore = openDescriptors();
      auto client = kj::newHttpClient(timer, env.table, *env.address);
      fill(*client);
      kjPool = (heapInUse() - before) / long(n);
      KJ_REQUIRE(openDescriptors() - fdsBefore == n, "kj's pool kept fewer idle connections",
          openDescriptors() - fdsBefore);
    }
    long sockets;
    {
      malloc_trim(0);
      long before = heapInUse();
      kj::Vector<kj::Own<kj::AsyncIoStream>> streams;
      uint fdsBefore = openDescriptors();
      for (uint i = 0; i < n; i++) streams.add(env.address->connect().wait(env.io.waitScope));
      sockets = (heapInUse() - before) / long(n);
      KJ_REQUIRE(openDescriptors() - fdsBefore == n, openDescriptors() - fdsBefore);
    }
    context.warning(kj::str("\nheap per idle connection (", n, " idle connections, mallinfo2 "
        "delta / ", n, "):"));
    context.warning(kj::str("  ConnectionPool                        ", ours, " bytes  (target <= "
        "4096: ", ours <= 4096 ? "met" : "MISSED", ")"));
    context.warning(kj::str("  kj pooled client                      ", kjPool, " bytes"));
    context.warning(kj::str("  bare kj socket (no HTTP at all)       ", sockets, " bytes"));
  }

  kj::MainBuilder::Validity run() {
    if (port == 0) return "--port is required (run through run-fetch-bench.sh)";
    Io env;
    env.address = env.io.provider->getNetwork().parseAddress("127.0.0.1", port)
        .wait(env.io.waitScope);
    benchBody(env, "/small", requests, 13);
    if (!smallOnly) benchBody(env, "/big", kj::max(requests / 4, 1u), 65536);
    if (idleConnections > 0) benchIdleMemory(env);
    return true;
  }
};

}  // namespace
}  // namespace sockfetch

KJ_MAIN(sockfetch::FetchBench)
