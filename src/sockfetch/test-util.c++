#include "test-util.h"

#include <sockfetch/kj-compat.h>

#include <kj/debug.h>
#include <kj/encoding.h>
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

namespace sockfetch {
namespace test {

bool Peer::tryFill() {
  char chunk[4096];
  size_t n = stream->tryRead(chunk, 1, sizeof(chunk)).wait(waitScope);
  buffer.addAll(chunk, chunk + n);
  return n > 0;
}

void Peer::fillAtLeast(size_t n) {
  while (buffer.size() < n) {
    KJ_ASSERT(tryFill(), "the client closed the connection early", n, buffer.size());
  }
}

kj::String Peer::readExactly(size_t n) {
  fillAtLeast(n);
  auto result = kj::heapString(buffer.begin(), n);
  kj::Vector<char> rest;
  rest.addAll(buffer.begin() + n, buffer.end());
  buffer = kj::mv(rest);
  return result;
}

kj::String Peer::readHead() {
  for (;;) {
    auto text = kj::arrayPtr(buffer.begin(), buffer.size());
    for (size_t i = 0; i + 4 <= text.size(); i++) {
      if (memcmp(text.begin() + i, "\r\n\r\n", 4) == 0) return readExactly(i + 4);
    }
    KJ_ASSERT(tryFill(), "the client closed the connection before a full request head");
  }
}

namespace {

kj::Maybe<kj::String> headerValue(kj::StringPtr head, kj::StringPtr name) {
  // Case-insensitive lookup of a header in a raw head.
  auto lowerHead = kj::heapString(head);
  for (auto& c: lowerHead) c = tolower(c);
  auto needle = kj::str("\r\n", name, ":");
  for (auto& c: needle) c = tolower(c);
  const char* found = strstr(lowerHead.cStr(), needle.cStr());
  if (found == nullptr) return nullptr;
  size_t start = found - lowerHead.cStr() + needle.size();
  size_t end = start;
  while (end < head.size() && head[end] != '\r') end++;
  while (start < end && head[start] == ' ') start++;
  return kj::heapString(head.slice(start).begin(), end - start);
}

}  // namespace

kj::String Peer::readRequest() {
  auto head = readHead();
  KJ_IF_SOME(length, headerValue(head, "content-length")) {
    return kj::str(head, readExactly(length.parseAs<size_t>()));
  }
  KJ_IF_SOME(te, headerValue(head, "transfer-encoding")) {
    KJ_ASSERT(te == "chunked", te);
    kj::Vector<char> body;
    for (;;) {
      // size line
      kj::String line;
      for (;;) {
        fillAtLeast(1);
        auto text = kj::arrayPtr(buffer.begin(), buffer.size());
        const char* nl = reinterpret_cast<const char*>(memchr(text.begin(), '\n', text.size()));
        if (nl != nullptr) {
          line = readExactly(nl - text.begin() + 1);
          break;
        }
        KJ_ASSERT(tryFill(), "the client closed the connection inside a chunked body");
      }
      size_t size = strtoul(line.cStr(), nullptr, 16);
      if (size == 0) {
        KJ_ASSERT(readExactly(2) == "\r\n", "chunked request body without final CRLF");
        break;
      }
      auto data = readExactly(size);
      body.addAll(data);
      KJ_ASSERT(readExactly(2) == "\r\n");
    }
    return kj::str(head, kj::arrayPtr(body.begin(), body.size()));
  }
  return head;
}

void Peer::send(kj::StringPtr bytes) {
  writeAll(*stream, bytes.asBytes()).wait(waitScope);
}

kj::Promise<void> Peer::sendLater(kj::StringPtr bytes) {
  return writeAll(*stream, bytes.asBytes());
}

bool Peer::readWouldBlock() {
  if (buffer.size() > 0) return false;
  char c;
  auto promise = stream->tryRead(&c, 1, 1);
  if (!promise.poll(waitScope)) return true;
  size_t n = promise.wait(waitScope);
  if (n > 0) buffer.add(c);
  return false;
}

bool Peer::sawEof() {
  if (buffer.size() > 0) return false;
  // A reset counts: a socket closed with unread input ends with RST rather than FIN.
  bool more = false;
  KJ_IF_SOME(e, kj::runCatchingExceptions([&]() { more = tryFill(); })) {
    return e.getType() == kj::Exception::Type::DISCONNECTED;
  }
  return !more;
}

bool LoopEnv::drainsToEnd(Peer& peer) {
  auto buffer = kj::heapArray<kj::byte>(1 << 16);
  auto deadline = timer.now() + limit;
  while (timer.now() < deadline) {
    // (evalNow: a reset is thrown by kj's socket from tryRead() itself.)
    auto read = kj::evalNow([&]() {
      return peer.getStream().tryRead(buffer.begin(), 1, buffer.size());
    });
    auto result = read.then([](size_t n) -> int { return n == 0 ? 1 : 0; },
                             [](kj::Exception&& e) -> int {
      return e.getType() == kj::Exception::Type::DISCONNECTED ? 1 : 2;
    }).exclusiveJoin(timer.afterDelay(deadline - timer.now()).then([]() { return 3; }));
    int outcome = result.wait(ws);
    if (outcome == 1) return true;
    if (outcome != 0) return false;
  }
  return false;
}

void resetConnection(Peer& peer) {
  int fd = KJ_ASSERT_NONNULL(peer.getStream().getFd());
  struct linger lin = {1, 0};
  KJ_SYSCALL(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lin, sizeof(lin)));
  peer.close();
}

void noDelay(Peer& peer) {
  int fd = KJ_ASSERT_NONNULL(peer.getStream().getFd());
  int one = 1;
  KJ_SYSCALL(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)));
}

namespace {

kj::Promise<void> trickleFrom(kj::AsyncIoStream& out, kj::Timer& timer, kj::StringPtr bytes,
    size_t i) {
  if (i == bytes.size()) return kj::READY_NOW;
  return out.write(bytes.begin() + i, 1).then([&out, &timer, bytes, i]() {
    return timer.afterDelay(100 * kj::MICROSECONDS).then([&out, &timer, bytes, i]() {
      return trickleFrom(out, timer, bytes, i + 1);
    });
  });
}

}  // namespace

kj::Promise<void> trickle(kj::AsyncIoStream& out, kj::Timer& timer, kj::StringPtr bytes) {
  return trickleFrom(out, timer, bytes, 0);
}

bool contains(kj::StringPtr haystack, kj::StringPtr needle) {
  return strstr(haystack.cStr(), needle.cStr()) != nullptr;
}

Transport pipeTransport() {
  auto pipe = kj::newTwoWayPipe();
  return Transport{kj::mv(pipe.ends[0]), kj::mv(pipe.ends[1])};
}

Transport tcpTransport(kj::AsyncIoContext& io) {
  auto& network = io.provider->getNetwork();
  auto listenAddress = network.parseAddress("127.0.0.1", 0).wait(io.waitScope);
  auto listener = listenAddress->listen();
  auto connectAddress =
      network.parseAddress("127.0.0.1", listener->getPort()).wait(io.waitScope);
  auto accepted = listener->accept();
  auto client = connectAddress->connect().wait(io.waitScope);
  auto server = accepted.wait(io.waitScope);
  return Transport{kj::mv(client), kj::mv(server)};
}

namespace {

class TlsLikeStream final: public kj::AsyncIoStream {
public:
  explicit TlsLikeStream(kj::Own<kj::AsyncIoStream> inner): inner(kj::mv(inner)) {}

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    return readLoop(reinterpret_cast<kj::byte*>(buffer), minBytes, maxBytes, 0);
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    return inner->write(buffer, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return inner->write(pieces);
  }
  kj::Promise<void> whenWriteDisconnected() override { return inner->whenWriteDisconnected(); }
  void shutdownWrite() override { inner->shutdownWrite(); }
  void abortRead() override { inner->abortRead(); }
  kj::Maybe<int> getFd() const override { return inner->getFd(); }

private:
  kj::Own<kj::AsyncIoStream> inner;
  kj::Vector<kj::byte> buffered;
  size_t offset = 0;
  bool eof = false;
  kj::byte chunk[4096];

  kj::Promise<size_t> readLoop(kj::byte* out, size_t minBytes, size_t maxBytes, size_t done) {
    size_t n = kj::min(maxBytes - done, buffered.size() - offset);
    if (n > 0) memcpy(out + done, buffered.begin() + offset, n);
    offset += n;
    done += n;
    if (offset == buffered.size()) {
      buffered.clear();
      offset = 0;
    }
    if (done >= minBytes || eof) {
      return kj::evalLater([done]() { return kj::evalLater([done]() { return done; }); });
    }
    return inner->tryRead(chunk, 1, sizeof(chunk))
        .then([this, out, minBytes, maxBytes, done](size_t got) {
      if (got == 0) eof = true;
      buffered.addAll(chunk, chunk + got);
      return readLoop(out, minBytes, maxBytes, done);
    });
  }
};

// A small SHA-1 (FIPS 180-4), only to answer WebSocket handshakes in tests.
kj::Array<kj::byte> sha1(kj::ArrayPtr<const kj::byte> message) {
  uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
  kj::Vector<kj::byte> data;
  data.addAll(message);
  data.add(0x80);
  while (data.size() % 64 != 56) data.add(0);
  uint64_t bits = uint64_t(message.size()) * 8;
  for (int i = 7; i >= 0; i--) data.add(kj::byte(bits >> (i * 8)));
  auto rotl = [](uint32_t x, int n) { return (x << n) | (x >> (32 - n)); };
  for (size_t chunk = 0; chunk < data.size(); chunk += 64) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++) {
      w[i] = uint32_t(data[chunk + 4 * i]) << 24 | uint32_t(data[chunk + 4 * i + 1]) << 16 |
          uint32_t(data[chunk + 4 * i + 2]) << 8 | uint32_t(data[chunk + 4 * i + 3]);
    }
    for (int i = 16; i < 80; i++) w[i] = rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
      uint32_t f, k;
      if (i < 20) {
        f = (b & c) | (~b & d);
        k = 0x5A827999;
      } else if (i < 40) {
        f = b ^ c ^ d;
        k = 0x6ED9EBA1;
      } else if (i < 60) {
        f = (b & c) | (b & d) | (c & d);
        k = 0x8F1BBCDC;
      } else {
        f = b ^ c ^ d;
        k = 0xCA62C1D6;
      }
      uint32_t t = rotl(a, 5) + f + e + k + w[i];
      e = d;
      d = c;
      c = rotl(b, 30);
      b = a;
      a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
  }
  auto out = kj::heapArray<kj::byte>(20);
  for (int i = 0; i < 20; i++) out[i] = kj::byte(h[i / 4] >> (24 - 8 * (i % 4)));
  return out;
}

}  // namespace

kj::String webSocketAccept(kj::StringPtr key) {
  auto input = kj::str(key, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
  return kj::encodeBase64(sha1(input.asBytes()));
}

// =================================================================================================
// ScriptedServer

namespace {

class IgnoreDisconnects final: public kj::TaskSet::ErrorHandler {
public:
  void taskFailed(kj::Exception&& exception) override {
    if (exception.getType() != kj::Exception::Type::DISCONNECTED) {
      KJ_LOG(ERROR, "scripted server task failed", exception);
    }
  }
};

kj::Maybe<size_t> requestLength(kj::ArrayPtr<const char> data) {
  // Length of the complete request at the start of `data`, if it is all there.
  kj::StringPtr text;
  for (size_t i = 0; i + 4 <= data.size(); i++) {
    if (memcmp(data.begin() + i, "\r\n\r\n", 4) != 0) continue;
    auto head = kj::heapString(data.begin(), i + 4);
    KJ_IF_SOME(length, headerValue(head, "content-length")) {
      size_t total = i + 4 + length.parseAs<size_t>();
      if (data.size() >= total) return total;
      return nullptr;
    }
    if (headerValue(head, "transfer-encoding") != nullptr) {
      for (size_t j = i + 4; j + 5 <= data.size(); j++) {
        if (memcmp(data.begin() + j, "0\r\n\r\n", 5) == 0 &&
            (j == i + 4 || data[j - 1] == '\n')) {
          return j + 5;
        }
      }
      return nullptr;
    }
    return i + 4;
  }
  return nullptr;
}

}  // namespace

struct ScriptedServer::Connection {
  ScriptedServer& server;
  unsigned index;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Vector<char> buffer;
  unsigned requests = 0;
  bool waitingForRequest = true;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> closeNow;

  Connection(ScriptedServer& server, unsigned index, kj::Own<kj::AsyncIoStream> stream)
      : server(server), index(index), stream(kj::mv(stream)) {
    server.connections.add(this);
    ++server.open;
  }
  ~Connection() noexcept(false) {
    forget(server.connections, this);
    --server.open;
  }
};

ScriptedServer::ScriptedServer(kj::AsyncIoContext& io, kj::StringPtr address, Handler handler)
    : io(io), handler(kj::mv(handler)), errorHandler(kj::heap<IgnoreDisconnects>()),
      tasks(*errorHandler) {
  kj::String unixAddress;
  if (address == "unix") {
    // A directory of its own: tests run in PID namespaces (the same getpid() in every sandbox),
    // so a path named after the process would collide between tests that run at once.
    char dir[] = "/tmp/sockfetch-test-XXXXXX";
    KJ_ASSERT(mkdtemp(dir) != nullptr, "making a directory for a unix socket failed", errno);
    unixDirectory = kj::heapString(dir);
    unixAddress = kj::str("unix:", dir, "/server.sock");
    address = unixAddress;
  }
  auto parsed = io.provider->getNetwork().parseAddress(address, 0).wait(io.waitScope);
  listener = parsed->listen();
  if (address.startsWith("unix:")) {
    addressText = kj::heapString(address);
  } else {
    addressText = kj::str(address, ":", listener->getPort());
  }
  tasks.add(acceptLoop());
}

ScriptedServer::~ScriptedServer() noexcept(false) {
  KJ_IF_SOME(dir, unixDirectory) {
    unlink(addressText.slice(strlen("unix:")).begin());
    rmdir(dir.cStr());
  }
}

kj::Own<kj::NetworkAddress> ScriptedServer::address() {
  return io.provider->getNetwork().parseAddress(addressText).wait(io.waitScope);
}

void ScriptedServer::closeIdleConnections() {
  for (auto connection: connections) {
    if (connection->waitingForRequest) {
      KJ_IF_SOME(f, connection->closeNow) {
        (f)->fulfill();
      }
    }
  }
}

kj::Promise<void> ScriptedServer::acceptLoop() {
  return listener->accept().then([this](kj::Own<kj::AsyncIoStream>&& stream) {
    auto connection = kj::heap<Connection>(*this, accepted++, kj::mv(stream));
    auto& ref = *connection;
    tasks.add(serve(ref).attach(kj::mv(connection)));
    return acceptLoop();
  });
}

kj::Promise<void> ScriptedServer::serve(Connection& c) {
  KJ_IF_SOME(length, requestLength(kj::arrayPtr(c.buffer.begin(), c.buffer.size()))) {
    c.waitingForRequest = false;
    auto text = kj::heapString(c.buffer.begin(), length);
    kj::Vector<char> rest;
    rest.addAll(c.buffer.begin() + length, c.buffer.end());
    c.buffer = kj::mv(rest);
    if (c.buffer.size() > 0) ++pipelined;  // a second request before the first was answered
    ++busy;
    maxBusy = kj::max(maxBusy, busy);
    auto reply = handler(c.index, c.requests++, text);
    // Watch for pipelined bytes while the reply is delayed.
    auto extra = kj::heapArray<char>(4096);
    auto watch = c.stream->tryRead(extra.begin(), 1, extra.size())
        .then([this, &c, extra = kj::mv(extra)](size_t n) mutable {
      if (n > 0) ++pipelined;
      c.buffer.addAll(extra.begin(), extra.begin() + n);
      return kj::Promise<void>(kj::NEVER_DONE);
    });
    auto delay = io.provider->getTimer().afterDelay(reply.delay).exclusiveJoin(kj::mv(watch));
    return delay.then([this, &c, reply = kj::mv(reply)]() mutable {
      auto write = writeAll(*c.stream, reply.bytes.asBytes());
      return write.then([this, &c, reply = kj::mv(reply)]() mutable -> kj::Promise<void> {
        --busy;
        ++served;
        if (reply.closeAfter) return kj::READY_NOW;  // returning ends the connection
        if (reply.thenUnsolicited.size() > 0) {
          auto extraBytes = kj::mv(reply.thenUnsolicited);
          return io.provider->getTimer().afterDelay(5 * kj::MILLISECONDS)
              .then([&c, extraBytes = kj::mv(extraBytes)]() mutable {
            return writeAll(*c.stream, extraBytes.asBytes()).attach(kj::mv(extraBytes));
          }).then([this, &c]() { return serve(c); });
        }
        return serve(c);
      });
    });
  }
  c.waitingForRequest = true;
  auto chunk = kj::heapArray<char>(4096);
  auto paf = kj::newPromiseAndFulfiller<void>();
  c.closeNow = kj::mv(paf.fulfiller);
  auto closeRequested = paf.promise.then([]() { return size_t(0); });
  auto read = c.stream->tryRead(chunk.begin(), 1, chunk.size());
  return read.exclusiveJoin(kj::mv(closeRequested))
      .then([this, &c, chunk = kj::mv(chunk)](size_t n) mutable -> kj::Promise<void> {
    c.closeNow = nullptr;
    if (n == 0) return kj::READY_NOW;  // the client closed, or the test closes it
    c.buffer.addAll(chunk.begin(), chunk.begin() + n);
    return serve(c);
  });
}

kj::Own<kj::AsyncIoStream> tlsLike(kj::Own<kj::AsyncIoStream> inner) {
  return kj::heap<TlsLikeStream>(kj::mv(inner));
}

ScriptedServer::Reply ok(kj::StringPtr body, kj::StringPtr extraHeaders) {
  ScriptedServer::Reply reply;
  reply.bytes = kj::str("HTTP/1.1 200 OK\r\n", extraHeaders, "Content-Length: ", body.size(),
      "\r\n\r\n", body);
  return reply;
}

kj::String pathOf(kj::StringPtr request) {
  auto start = request.findFirst(' ').orDefault(0) + 1;
  auto end = start;
  while (end < request.size() && request[end] != ' ') end++;
  return kj::heapString(request.slice(start).begin(), end - start);
}

kj::Promise<void> readHeadInto(kj::AsyncIoStream& stream, kj::Vector<char>& buffer) {
  for (size_t i = 0; i + 4 <= buffer.size(); i++) {
    if (memcmp(buffer.begin() + i, "\r\n\r\n", 4) == 0) return kj::READY_NOW;
  }
  auto chunk = kj::heapArray<char>(1024);
  auto ptr = chunk.begin();
  return kj::evalNow([&]() { return stream.tryRead(ptr, 1, 1024); })
      .then([&stream, &buffer, chunk = kj::mv(chunk)](size_t n) mutable -> kj::Promise<void> {
    if (n == 0) return KJ_EXCEPTION(DISCONNECTED, "the client closed before a request head");
    buffer.addAll(chunk.begin(), chunk.begin() + n);
    return readHeadInto(stream, buffer);
  });
}

kj::Maybe<kj::Exception> failureIfAny(LoopEnv& env, kj::Promise<void> promise) {
  return kj::runCatchingExceptions([&]() { env.bounded(kj::mv(promise)); });
}

kj::Maybe<size_t> bytesBeforeEnd(LoopEnv& env, kj::AsyncIoStream& stream) {
  auto buffer = kj::heapArray<kj::byte>(1 << 16);
  size_t total = 0;
  auto deadline = env.timer.now() + env.limit;
  while (env.timer.now() < deadline) {
    auto read = kj::evalNow([&]() { return stream.tryRead(buffer.begin(), 1, buffer.size()); });
    auto n = read.then([](size_t n) -> int64_t { return n; },
                       [](kj::Exception&& e) -> int64_t {
      return e.getType() == kj::Exception::Type::DISCONNECTED ? 0 : -2;
    }).exclusiveJoin(env.timer.afterDelay(deadline - env.timer.now()).then([]() -> int64_t {
      return -1;
    })).wait(env.ws);
    if (n == 0) return total;
    if (n < 0) return nullptr;
    total += n;
  }
  return nullptr;
}

}  // namespace test
}  // namespace sockfetch
