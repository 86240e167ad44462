/// A device that answers guest port I/O (`in`/`out`). Offsets are relative to
/// the base port the device was attached at.
public protocol PortIODevice: AnyObject, Sendable {
    func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer)
    func write(offset: UInt16, from data: UnsafeRawBufferPointer)
}

/// The port I/O address space: ranges of ports mapped to devices. Built while
/// the machine is assembled, read-only once vCPUs run (so no lock is needed).
public final class PortIOBus: Sendable {
    struct Mapping: Sendable {
        let base: UInt16
        let count: UInt16
        let device: any PortIODevice
    }

    private let mappings: [Mapping]

    public struct Builder {
        var mappings: [Mapping] = []
        public init() {}

        public enum Error: Swift.Error, CustomStringConvertible {
            case overlap(UInt16)
            public var description: String {
                switch self {
                case .overlap(let port): "port range at 0x\(String(port, radix: 16)) overlaps another device"
                }
            }
        }

        public mutating func attach(_ device: any PortIODevice, at base: UInt16, count: UInt16) throws {
            let end = UInt32(base) + UInt32(count)
            if mappings.contains(where: { UInt32($0.base) < end && UInt32($0.base) + UInt32($0.count) > UInt32(base) }) {
                throw Error.overlap(base)
            }
            mappings.append(Mapping(base: base, count: count, device: device))
        }

        public func build() -> PortIOBus { PortIOBus(mappings: mappings) }
    }

    private init(mappings: [Mapping]) { self.mappings = mappings }

    private func mapping(for port: UInt16) -> Mapping? {
        mappings.first { port >= $0.base && UInt32(port) < UInt32($0.base) + UInt32($0.count) }
    }

    /// Returns false when no device owns the port; the reply is then all ones,
    /// as an unconnected ISA bus reads.
    @discardableResult
    public func read(port: UInt16, into data: UnsafeMutableRawBufferPointer) -> Bool {
        guard let mapping = mapping(for: port) else {
            for i in data.indices { data[i] = 0xFF }
            return false
        }
        mapping.device.read(offset: port - mapping.base, into: data)
        return true
    }

    @discardableResult
    public func write(port: UInt16, from data: UnsafeRawBufferPointer) -> Bool {
        guard let mapping = mapping(for: port) else { return false }
        mapping.device.write(offset: port - mapping.base, from: data)
        return true
    }
}
