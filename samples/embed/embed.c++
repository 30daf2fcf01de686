// Embedding sockfetch in a KJ application: one StreamFetcher, many sequential requests over one
// connection, and the one-request-at-a-time rule in action; then a ConnectionPool serving many
// requests at once over a few connections, with its statistics.
//
// Runs standalone: it starts its own kj::HttpServer on 127.0.0.1 (an ephemeral port) and counts
// the connections that server accepts, to show that one connection served every request.
//
//   bazel run //samples/embed -- [REQUESTS]

#include <sockfetch/kj-compat.h>
#include <sockfetch/pool.h>
#include <sockfetch/stream-fetcher.h>

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/debug.h>
#include <kj/main.h>
#include <kj/vector.h>

namespace {

using kj::uint;

class HelloService final: public kj::HttpService {
  // Answers every request with "hello from <path>".
public:
  explicit HelloService(const kj::HttpHeaderTable& table): table(table) {}

  kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url,
      const kj::HttpHeaders& headers, kj::AsyncInputStream& requestBody,
      Response& response) override {
    auto body = kj::str("hello from ", url);
    kj::HttpHeaders responseHeaders(table);
    responseHeaders.set(kj::HttpHeaderId::CONTENT_TYPE, "text/plain");
    auto stream = response.send(200, "OK", responseHeaders, body.size());
    auto promise = stream->write(body.begin(), body.size());
    return promise.attach(kj::mv(stream), kj::mv(body));
  }

private:
  const kj::HttpHeaderTable& table;
};

class EmbedMain {
public:
  explicit EmbedMain(kj::ProcessContext& context): context(context) {}

  kj::MainBuilder::Validity setRequests(kj::StringPtr arg) {
    if (kj::runCatchingExceptions([&]() { requests = arg.parseAs<uint>(); }) != sockfetch::none) {
      return "REQUESTS must be a whole number, e.g. 1000";
    }
    if (requests == 0) return "REQUESTS must be at least 1";
    return true;
  }

  kj::MainBuilder::Validity run() {
    auto io = kj::setupAsyncIo();
    kj::HttpHeaderTable table;

    // A local server, counting the connections it accepts.
    HelloService service(table);
    kj::HttpServer server(io.provider->getTimer(), table, service);
    auto& network = io.provider->getNetwork();
    auto listener = network.parseAddress("127.0.0.1", 0).wait(io.waitScope)->listen();
    uint accepted = 0;
    auto acceptLoop = acceptForever(*listener, server, accepted).eagerlyEvaluate(
        [](kj::Exception&& e) { KJ_LOG(ERROR, "accept failed", e); });

    // The client side: one connection, owned by one StreamFetcher.
    auto address = network.parseAddress("127.0.0.1", listener->getPort()).wait(io.waitScope);
    sockfetch::StreamFetcher fetcher(address->connect().wait(io.waitScope), table);

    kj::HttpHeaders headers(table);
    headers.set(kj::HttpHeaderId::HOST, "localhost");
    kj::String last;
    for (uint i = 0; i < requests; i++) {
      auto request = fetcher.request(kj::HttpMethod::GET, kj::str("/item/", i), headers);
      request.body = nullptr;
      auto response = request.response.wait(io.waitScope);
      KJ_REQUIRE(response.statusCode == 200, response.statusCode);
      last = response.body->readAllText().wait(io.waitScope);
    }
    context.warning(kj::str(requests, " sequential requests, last response: \"", last, "\""));
    context.warning(kj::str("connections accepted by the server: ", accepted,
        "; requests completed on the fetcher's connection: ", fetcher.getCompletedRequests()));

    // One request at a time: a second request while the first is in flight is refused at once,
    // and nothing is written for it.
    auto first = fetcher.request(kj::HttpMethod::GET, "/first", headers);
    first.body = nullptr;
    KJ_IF_SOME(e, kj::runCatchingExceptions([&]() {
      fetcher.request(kj::HttpMethod::GET, "/second", headers);
    })) {
      context.warning(kj::str("a concurrent request was refused: ", e.getDescription()));
    } else {
      context.exitError("a concurrent request was not refused");
    }
    auto response = first.response.wait(io.waitScope);
    auto text = response.body->readAllText().wait(io.waitScope);
    context.warning(kj::str("the first request is unaffected: \"", text, "\"; the fetcher is ",
        fetcher.getState(), " again"));

    if (accepted != 1 || fetcher.getCompletedRequests() != requests + 1) {
      context.exitError("expected exactly one connection to serve every request");
    }

    // Many requests at once: a ConnectionPool spreads them over a few connections, one request
    // per connection at a time, and reuses those connections.
    sockfetch::ConnectionPool::Settings poolSettings;
    poolSettings.maxConnections = 8;
    sockfetch::ConnectionPool pool(io.provider->getTimer(), table, *address, poolSettings);
    uint acceptedBefore = accepted;
    kj::Vector<kj::Promise<kj::String>> inFlight;
    for (uint i = 0; i < requests; i++) {
      auto request = pool.request(kj::HttpMethod::GET, kj::str("/parallel/", i), headers);
      request.body = nullptr;
      inFlight.add(request.response.then([](kj::HttpClient::Response&& response) {
        return response.body->readAllText().attach(kj::mv(response.body));
      }));
    }
    auto texts = kj::joinPromises(inFlight.releaseAsArray()).wait(io.waitScope);
    for (uint i = 0; i < requests; i++) {
      KJ_REQUIRE(texts[i] == kj::str("hello from /parallel/", i), texts[i]);
    }
    auto& stats = pool.getStats();
    context.warning(kj::str(requests, " parallel requests through a ConnectionPool (max ",
        poolSettings.maxConnections, " connections): connections opened ",
        stats.connectionsOpened, " (server accepted ", accepted - acceptedBefore, "), reuses ",
        stats.reuses, ", waits ", stats.waits, ", retries ", stats.retries, ", dropped ",
        stats.dropped(), ", idle now ", pool.getIdleCount()));
    if (stats.connectionsOpened > poolSettings.maxConnections) {
      context.exitError("the pool opened more connections than allowed");
    }
    return true;
  }

  kj::MainFunc getMain() {
    return kj::MainBuilder(context, "sockfetch embedding sample",
        "Starts a local HTTP server, sends REQUESTS (default 1000) sequential requests to it "
        "over one StreamFetcher, and shows that one connection served them all.")
        .expectOptionalArg("REQUESTS", KJ_BIND_METHOD(*this, setRequests))
        .callAfterParsing(KJ_BIND_METHOD(*this, run))
        .build();
  }

private:
  kj::ProcessContext& context;
  uint requests = 1000;

  static kj::Promise<void> acceptForever(
      kj::ConnectionReceiver& listener, kj::HttpServer& server, uint& accepted) {
    return listener.accept().then([&listener, &server, &accepted](
        kj::Own<kj::AsyncIoStream>&& connection) {
      ++accepted;
      auto served = server.listenHttp(kj::mv(connection));
      return served.exclusiveJoin(acceptForever(listener, server, accepted));
    });
  }
};

}  // namespace

KJ_MAIN(EmbedMain)
