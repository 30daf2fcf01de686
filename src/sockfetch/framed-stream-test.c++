#include "framed-stream.h"

#include <sockfetch/kj-compat.h>
#include <sockfetch/test-util.h>

#include <kj/debug.h>
#include <kj/io.h>
#include <kj/test.h>
#include <kj/timer.h>
#include <unistd.h>

namespace sockfetch {
namespace {

class IgnoreLoss final: public FramedStream::IdleListener {
public:
  void idleConnectionLost(bool, kj::String) override {}
};

class RecordLoss final: public FramedStream::IdleListener {
public:
  void idleConnectionLost(bool gotBytes, kj::String reason) override {
    lost = true;
    this->gotBytes = gotBytes;
    this->reason = kj::mv(reason);
  }
  bool lost = false;
  bool gotBytes = false;
  kj::String reason;
};

void readPastEnd(bool tcp) {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  auto transport = tcp ? test::tcpTransport(io) : test::pipeTransport();
  FramedStream stream(kj::mv(transport.client), ResponseFramer::Limits(),
      io.provider->getTimer());
  test::Peer peer(io.waitScope, kj::mv(transport.server));
  IgnoreLoss listener;
  stream.watchIdle(listener);
  KJ_EXPECT(stream.checkIdleNow() == nullptr);
  stream.beginExchange(kj::HttpMethod::GET);

  auto request = writeAll(stream, "GET / HTTP/1.1\r\nHost: test\r\n\r\n"_kj.asBytes());
  peer.readRequest();
  request.wait(io.waitScope);
  constexpr kj::StringPtr RESPONSE = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"_kj;
  auto sent = peer.sendLater(RESPONSE);
  char buffer[64];
  size_t got = 0;
  while (got < RESPONSE.size()) {
    got += stream.tryRead(buffer + got, 1, sizeof(buffer) - got).wait(io.waitScope);
  }
  sent.wait(io.waitScope);
  KJ_EXPECT(kj::heapString(buffer, got) == RESPONSE);
  KJ_EXPECT(stream.getFramer().isComplete());

  // kj-http reads on after a response to notice the connection closing: that read just waits.
  {
    auto afterResponse = stream.tryRead(buffer, 1, sizeof(buffer));
    KJ_EXPECT(!afterResponse.poll(io.waitScope));
  }
  // A read into the consumer's body buffer that needs bytes past the response's end means kj-http
  // and the framer disagree where the response ends: it fails rather than waiting forever.
  char body[16];
  stream.setBodyBuffer(kj::arrayPtr(reinterpret_cast<kj::byte*>(body), sizeof(body)));
  {
    auto intoOwnBuffer = stream.tryRead(buffer, 1, sizeof(buffer));
    KJ_EXPECT(!intoOwnBuffer.poll(io.waitScope));
  }
  KJ_EXPECT_THROW_MESSAGE("reached past the end of the response",
      stream.tryRead(body + 4, 1, sizeof(body) - 4).wait(io.waitScope));
}

KJ_TEST("FramedStream fails a body read past the framed end of a response (pipe)") {
  readPastEnd(false);
}

KJ_TEST("FramedStream fails a body read past the framed end of a response (tcp)") {
  readPastEnd(true);
}

void watchesIdle(bool tcp) {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  auto transport = tcp ? test::tcpTransport(io) : test::pipeTransport();
  FramedStream stream(kj::mv(transport.client), ResponseFramer::Limits(),
      io.provider->getTimer());
  test::Peer peer(io.waitScope, kj::mv(transport.server));
  RecordLoss listener;
  stream.watchIdle(listener);
  auto sent = peer.sendLater("X");
  if (tcp) {
    // Asked right away (no turn of the event loop in between), a socket is asked directly. (Other
    // streams need a turn: an exchange's gate gives them one.)
    KJ_EXPECT(KJ_ASSERT_NONNULL(stream.checkIdleNow()).gotBytes);
  }
  // And left alone, it notices by itself (on a socket, once the event loop goes idle).
  timer.afterDelay(20 * kj::MILLISECONDS).wait(io.waitScope);
  KJ_EXPECT(listener.lost);
  KJ_EXPECT(listener.gotBytes, listener.reason);
  sent.wait(io.waitScope);
}

void oldViewIsInert(bool tcp) {
  // A kj::HttpClient is kept past its exchange (its buffer holds the response headers): the view
  // it reads and writes through must not reach the next exchange's bytes.
  kj::AsyncIoContext io = kj::setupAsyncIo();
  auto transport = tcp ? test::tcpTransport(io) : test::pipeTransport();
  FramedStream stream(kj::mv(transport.client), ResponseFramer::Limits(),
      io.provider->getTimer());
  test::Peer peer(io.waitScope, kj::mv(transport.server));
  IgnoreLoss listener;
  constexpr kj::StringPtr REQUEST = "GET / HTTP/1.1\r\nHost: test\r\n\r\n"_kj;
  constexpr kj::StringPtr RESPONSE = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"_kj;
  char buffer[64];

  stream.watchIdle(listener);
  KJ_EXPECT(stream.checkIdleNow() == nullptr);
  stream.beginExchange(kj::HttpMethod::GET);
  auto old = kj::heap<FramedStream::ExchangeView>(stream);
  auto request = writeAll(*old, REQUEST.asBytes());
  peer.readRequest();
  request.wait(io.waitScope);
  auto sent = peer.sendLater(RESPONSE);
  size_t got = 0;
  while (got < RESPONSE.size()) {
    got += old->tryRead(buffer + got, 1, sizeof(buffer) - got).wait(io.waitScope);
  }
  sent.wait(io.waitScope);
  stream.watchIdle(listener);  // the exchange is over

  auto oldRead = old->tryRead(buffer, 1, sizeof(buffer));
  KJ_EXPECT_THROW_MESSAGE("this exchange is over",
      writeAll(*old, "x"_kj.asBytes()).wait(io.waitScope));

  // The next exchange's response goes to its own view only.
  KJ_EXPECT(stream.checkIdleNow() == nullptr);
  stream.beginExchange(kj::HttpMethod::GET);
  FramedStream::ExchangeView next(stream);
  auto request2 = writeAll(next, REQUEST.asBytes());
  peer.readRequest();
  request2.wait(io.waitScope);
  KJ_EXPECT_THROW_MESSAGE("this exchange is over",
      writeAll(*old, "x"_kj.asBytes()).wait(io.waitScope));
  auto sent2 = peer.sendLater(RESPONSE);
  got = 0;
  while (got < RESPONSE.size()) {
    got += next.tryRead(buffer + got, 1, sizeof(buffer) - got).wait(io.waitScope);
  }
  sent2.wait(io.waitScope);
  KJ_EXPECT(kj::heapString(buffer, got) == RESPONSE);
  KJ_EXPECT(!oldRead.poll(io.waitScope));
  KJ_EXPECT(!old->tryRead(buffer, 1, sizeof(buffer)).poll(io.waitScope));
}

KJ_TEST("FramedStream: an exchange's view cannot touch the next exchange (pipe)") {
  oldViewIsInert(false);
}

KJ_TEST("FramedStream: an exchange's view cannot touch the next exchange (tcp)") {
  oldViewIsInert(true);
}

KJ_TEST("FramedStream watches an idle connection, asked or not (pipe)") {
  watchesIdle(false);
}

KJ_TEST("FramedStream watches an idle connection, asked or not (tcp)") {
  watchesIdle(true);
}

KJ_TEST("FramedStream watches every idle socket of a thread, however many go idle at once") {
  // Sockets start their idle reads from one deferral shared by the thread: each of a batch that
  // went idle together must be watched, one taken out of the batch (an exchange began, or it was
  // destroyed) must not be, and a socket going idle after the batch was served gets a new one.
  test::LoopEnv env;
  constexpr size_t COUNT = 8;
  struct Connection {
    kj::Own<FramedStream> stream;
    kj::Own<test::Peer> peer;
    RecordLoss listener;
  };
  kj::Vector<Connection> connections;
  for (size_t i = 0; i < COUNT + 1; i++) {
    auto transport = test::tcpTransport(env.io);
    connections.add(Connection{
        kj::heap<FramedStream>(kj::mv(transport.client), ResponseFramer::Limits(), env.timer),
        kj::heap<test::Peer>(env.ws, kj::mv(transport.server)), RecordLoss()});
  }
  for (size_t i = 0; i < COUNT; i++) connections[i].stream->watchIdle(connections[i].listener);
  // Out of the batch before the event loop was idle: one begins an exchange, one is destroyed.
  connections[2].stream->beginExchange(kj::HttpMethod::GET);
  connections[5].stream = nullptr;

  // The servers close half of the connections and write to the other half.
  kj::Vector<kj::Promise<void>> sent;
  for (size_t i = 0; i < COUNT; i++) {
    if (i % 2 == 0) {
      connections[i].peer->close();
    } else {
      sent.add(connections[i].peer->sendLater("X"));
    }
  }
  auto watched = [&](size_t i) { return i != 2 && i != 5; };
  env.waitFor([&]() {
    for (size_t i = 0; i < COUNT; i++) {
      if (watched(i) && !connections[i].listener.lost) return false;
    }
    return true;
  });
  for (size_t i = 0; i < COUNT; i++) {
    KJ_EXPECT(connections[i].listener.lost == watched(i), i);
    if (watched(i)) {
      KJ_EXPECT(connections[i].listener.gotBytes == (i % 2 == 1), i);
    }
  }
  for (auto& promise: sent) env.bounded(kj::mv(promise));

  // The batch was served: a socket going idle now is watched too.
  auto& late = connections[COUNT];
  late.stream->watchIdle(late.listener);
  late.peer->close();
  env.waitFor([&]() { return late.listener.lost; });
  KJ_EXPECT(late.listener.lost);
  KJ_EXPECT(!late.listener.gotBytes);
}

KJ_TEST("FramedStream over a descriptor that is not a socket waits for its idle read") {
  // kj's descriptor stream over a pipe: the kernel cannot be asked with MSG_PEEK, so the idle
  // read must be outstanding and the gate must wait for it, as for any other stream.
  kj::AsyncIoContext io = kj::setupAsyncIo();
  int fds[2];
  KJ_SYSCALL(pipe(fds));
  kj::AutoCloseFd writeEnd(fds[1]);
  auto readEnd = io.lowLevelProvider->wrapSocketFd(fds[0],
      kj::LowLevelAsyncIoProvider::TAKE_OWNERSHIP);
  FramedStream stream(kj::mv(readEnd), ResponseFramer::Limits(), io.provider->getTimer());
  IgnoreLoss listener;
  stream.watchIdle(listener);
  KJ_SYSCALL(write(writeEnd, "X", 1));
  KJ_EXPECT(stream.checkIdleNow() == nullptr);  // nothing reported yet, and no kernel to ask
  stream.beginExchange(kj::HttpMethod::GET);
  char buffer[16];
  KJ_EXPECT_THROW_MESSAGE("before any request was sent",
      stream.tryRead(buffer, 1, sizeof(buffer)).wait(io.waitScope));
  KJ_EXPECT(stream.getGateLoss() != nullptr);
}

KJ_TEST("FramedStream's gate waiting for unread input ends when the idle read reports") {
  // A wrapped stream (TLS-like) over TCP, with a timer that never fires: the gate's wait for the
  // event loop to poll must still end, because the idle read reporting ends it too.
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::TimerImpl stoppedTimer(kj::origin<kj::TimePoint>());
  auto transport = test::tcpTransport(io);
  FramedStream stream(test::tlsLike(kj::mv(transport.client)), ResponseFramer::Limits(),
      stoppedTimer);
  test::Peer peer(io.waitScope, kj::mv(transport.server));
  IgnoreLoss listener;
  stream.watchIdle(listener);
  peer.send("X");  // in the kernel; the event loop has not polled since
  stream.beginExchange(kj::HttpMethod::GET);
  auto write = stream.write("GET / HTTP/1.1\r\n\r\n", 18);
  auto& timer = io.provider->getTimer();
  KJ_EXPECT_THROW_MESSAGE("before any request was sent",
      write.exclusiveJoin(timer.afterDelay(1 * kj::SECONDS)
      .then([]() { KJ_FAIL_ASSERT("the gate never ended"); })).wait(io.waitScope));
}

KJ_TEST("FramedStream destroyed while its gate settles leaves a pending write safe") {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  auto transport = test::tcpTransport(io);
  auto stream = kj::heap<FramedStream>(test::tlsLike(kj::mv(transport.client)),
      ResponseFramer::Limits(), io.provider->getTimer());
  test::Peer peer(io.waitScope, kj::mv(transport.server));
  IgnoreLoss listener;
  stream->watchIdle(listener);
  peer.send("X");
  stream->beginExchange(kj::HttpMethod::GET);
  auto write = stream->write("GET / HTTP/1.1\r\n\r\n", 18);
  stream = nullptr;  // the write still holds a branch of the gate
  KJ_EXPECT_THROW_MESSAGE("closed before the request was written", write.wait(io.waitScope));
}

void writeAfterReset(bool pieces) {
  // The kernel reports a reset once: the first send after the RST fails with ECONNRESET and
  // clears it; every later one sees only a closed socket (EPIPE, "Broken pipe", and SIGPIPE
  // without MSG_NOSIGNAL). A write that the stream first tries itself (sendNow()) and then leaves
  // to kj's write, so that kj reports it, must not use up that report on the way: the caller
  // would be told of a broken pipe, not that the server reset the connection.
  kj::AsyncIoContext io = kj::setupAsyncIo();
  auto transport = test::tcpTransport(io);
  FramedStream stream(kj::mv(transport.client), ResponseFramer::Limits(),
      io.provider->getTimer());
  test::Peer peer(io.waitScope, kj::mv(transport.server));
  IgnoreLoss listener;
  stream.watchIdle(listener);
  KJ_EXPECT(stream.checkIdleNow() == nullptr);
  stream.beginExchange(kj::HttpMethod::POST);
  auto head = "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 4\r\n\r\n"_kj;
  writeAll(stream, head.asBytes()).wait(io.waitScope);
  peer.readHead();
  test::resetConnection(peer);  // on loopback the RST has arrived when this returns
  auto body = "body"_kj.asBytes();
  kj::ArrayPtr<const kj::byte> parts[] = {body.slice(0, 2), body.slice(2, 4)};
  KJ_EXPECT_THROW_MESSAGE("Connection reset by peer", (pieces
      ? stream.write(kj::arrayPtr(parts, 2))
      : stream.write(body.begin(), body.size())).wait(io.waitScope));
}

KJ_TEST("FramedStream reports a write to a connection the server reset as a reset (tcp)") {
  writeAfterReset(false);
}

KJ_TEST("FramedStream reports a write of pieces to a connection the server reset as a reset "
    "(tcp)") {
  writeAfterReset(true);
}

}  // namespace
}  // namespace sockfetch
