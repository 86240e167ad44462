import Glibc
import Synchronization
import TernKVM
import TernWire

/// A destination's listener, with each new connection's handshake (TLS, up to its deadline) run on a
/// thread of its own: a peer that is slow or silent in its handshake holds up only itself, never the
/// real source behind it. Secured connections are handed out in the order they became ready.
public final class IncomingConnections: Sendable {
    private let listener: FileDescriptor
    private let security: ChannelSecurity
    /// Connections secured and not yet handed out; `closed` once the migration has its VM.
    private let ready = Mutex<(connections: [Connection], closed: Bool)>(([], false))
    /// Written once per connection made ready, so that `next` can wait on it beside the listener.
    private let wakeRead: FileDescriptor
    private let wakeWrite: FileDescriptor
    private let refused: @Sendable (any Error) -> Void

    /// `refused` hears of each connection turned away in its handshake (on that connection's thread).
    public init(listener: FileDescriptor, security: ChannelSecurity, refused: @escaping @Sendable (any Error) -> Void) throws {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw SystemError("pipe", errno: errno) }
        for fd in fds {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        }
        wakeRead = FileDescriptor(adopting: fds[0])
        wakeWrite = FileDescriptor(adopting: fds[1])
        self.listener = listener
        self.security = security
        self.refused = refused
    }

    /// The next secured connection: accepts and starts handshakes until one is ready.
    /// Throws when the listener is shut down (a quit, a signal).
    public func next() throws -> Connection {
        while true {
            if let connection = ready.withLock({ $0.connections.isEmpty ? nil : $0.connections.removeFirst() }) { return connection }
            var entries = [pollfd(fd: listener.rawValue, events: Int16(POLLIN), revents: 0),
                           pollfd(fd: wakeRead.rawValue, events: Int16(POLLIN), revents: 0)]
            let count = poll(&entries, 2, -1)
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { throw SystemError("poll", errno: errno) }
            if entries[1].revents != 0 {
                var drain = [UInt8](repeating: 0, count: 64)
                _ = drain.withUnsafeMutableBytes { read(wakeRead.rawValue, $0.baseAddress, $0.count) }
            }
            if entries[0].revents != 0 {
                let socket = try Endpoint.accept(listener)
                let security = self.security
                _ = spawnThread(named: "handshake") { [self] in
                    do {
                        hand(try security.establish(socket))
                    } catch {
                        refused(error)
                    }
                }
            }
        }
    }

    /// Once the migration has its VM, connections still handshaking or waiting are closed as they come:
    /// their sources learn at once that this destination is taken.
    public func close() {
        let waiting = ready.withLock { state in
            defer { state = ([], true) }
            return state.connections
        }
        for connection in waiting { shutdown(connection.rawValue, Int32(SHUT_RDWR)) }
    }

    private func hand(_ connection: Connection) {
        let taken = ready.withLock { state in
            if !state.closed { state.connections.append(connection) }
            return state.closed
        }
        if taken {
            shutdown(connection.rawValue, Int32(SHUT_RDWR))
            return
        }
        var byte: UInt8 = 1
        _ = write(wakeWrite.rawValue, &byte, 1)
    }
}
