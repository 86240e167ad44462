import Glibc
import Synchronization
import TernKVM

/// The serial console on a listening Unix socket (`--serial socket:PATH`):
/// one client at a time (e.g. `socat - UNIX-CONNECT:PATH`) sees the output and
/// can type input. Output while nobody is connected is dropped, as on a real
/// serial line with no cable.
public final class SocketSerialConnection: SerialConnection {
    private let path: String
    private let listener: FileDescriptor
    private let client = Mutex<FileDescriptor?>(nil)
    private let closed = Atomic<Bool>(false)

    public init(path: String) throws {
        self.path = path
        listener = try UnixSocket.listen(path: path, backlog: 1)
    }

    public func transmit(_ byte: UInt8) {
        client.withLock { connection in
            guard let fd = connection?.rawValue else { return }
            var value = byte
            if send(fd, &value, 1, Int32(MSG_NOSIGNAL)) != 1 && errno != EINTR {
                connection = nil // the client went away
            }
        }
    }

    public func startReceiving(_ deliver: @escaping @Sendable ([UInt8]) -> Void) {
        spawnThread(named: "serial-socket") { [self] in acceptLoop(deliver) }
    }

    private func acceptLoop(_ deliver: @Sendable ([UInt8]) -> Void) {
        while !closed.load(ordering: .relaxed) {
            let fd = accept(listener.rawValue, nil, nil)
            if fd < 0 {
                if errno == EINTR { continue }
                return // listener closed
            }
            let connection = FileDescriptor(adopting: fd)
            client.withLock { $0 = connection }
            var buffer = [UInt8](repeating: 0, count: 256)
            while true {
                let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if count > 0 { deliver(Array(buffer[0..<count])); continue }
                if count < 0 && errno == EINTR { continue }
                break
            }
            client.withLock { if $0 === connection { $0 = nil } }
        }
    }

    public func close() {
        closed.store(true, ordering: .relaxed)
        shutdown(listener.rawValue, Int32(SHUT_RDWR))
        unlink(path)
    }
}
