import CKVM
import Foundation
import Glibc
import TernKVM

/// An existing TAP interface, attached for this VM: frames read and written
/// with a 12-byte virtio-net header in front (IFF_VNET_HDR), non-blocking.
///
/// Tern does not create TAPs (as Firecracker does not): whoever sets up the
/// host's network makes one (`ip tuntap add dev tap0 mode tap`) and puts it on
/// a bridge; Tern refuses a name that is not a TAP, or one another process holds.
public final class TapDevice: Sendable {
    public let name: String
    public let fd: FileDescriptor
    /// struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
    public static let headerSize = 12

    public enum OpenError: Error, Equatable, CustomStringConvertible {
        case noSuchInterface(String)
        case notATap(String)
        case busy(String)
        case failed(String, String)

        public var description: String {
            switch self {
            case .noSuchInterface(let name): "no network interface '\(name)' (create the TAP first: ip tuntap add dev \(name) mode tap)"
            case .notATap(let name): "interface '\(name)' is not a TAP device"
            case .busy(let name): "TAP '\(name)' is in use by another process"
            case .failed(let name, let why): "cannot attach to TAP '\(name)': \(why)"
            }
        }
    }

    public init(name: String) throws(OpenError) {
        // TUNSETIFF would create a missing interface: insist on one that exists and is a TUN/TAP.
        guard FileManager.default.fileExists(atPath: "/sys/class/net/\(name)") else { throw .noSuchInterface(name) }
        guard let flags = try? String(contentsOfFile: "/sys/class/net/\(name)/tun_flags", encoding: .utf8),
              let value = Int(flags.trimmingCharacters(in: .whitespacesAndNewlines).dropFirst(2), radix: 16),
              value & Int(IFF_TAP) != 0 else { throw .notATap(name) }
        let raw = Glibc.open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC)
        guard raw >= 0 else { throw .failed(name, "/dev/net/tun: \(String(cString: strerror(errno)))") }
        let fd = FileDescriptor(adopting: raw)
        guard ckvm_tap_attach(raw, name, Int32(Self.headerSize)) == 0 else {
            throw errno == EBUSY ? .busy(name) : .failed(name, String(cString: strerror(errno)))
        }
        self.name = name
        self.fd = fd
    }

    /// Reads one frame into `buffers` (header included); nil when none is waiting, or -errno.
    func receive(into buffers: GuestBuffers) -> Int? {
        let vectors = buffers.withIOVecs { $0 }
        while true {
            let count = vectors.withUnsafeBufferPointer { readv(fd.rawValue, $0.baseAddress, Int32(min($0.count, 1024))) }
            if count >= 0 { return count }
            if errno == EINTR { continue }
            return errno == EAGAIN ? nil : -Int(errno)
        }
    }

    /// Writes one Ethernet frame the host makes (an announcement), behind a header that asks for nothing.
    public func send(frame: [UInt8]) -> Bool {
        let bytes = [UInt8](repeating: 0, count: Self.headerSize) + frame
        while true {
            let count = bytes.withUnsafeBytes { write(fd.rawValue, $0.baseAddress, $0.count) }
            if count == bytes.count { return true }
            if count < 0 && errno == EINTR { continue }
            return false
        }
    }

    /// Writes one frame (header included). A full TAP queue drops the frame, as a wire would.
    func send(_ buffers: GuestBuffers) -> Bool {
        let vectors = buffers.withIOVecs { $0 }
        while true {
            let count = vectors.withUnsafeBufferPointer { writev(fd.rawValue, $0.baseAddress, Int32(min($0.count, 1024))) }
            if count >= 0 { return true }
            if errno == EINTR { continue }
            return false
        }
    }
}
