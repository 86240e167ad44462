/// A guest-physical address. A distinct type so that it cannot be mixed up
/// with host pointers or offsets into the memory file (see rust-vmm's vm-memory).
public struct GuestAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible, Codable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }

    public static func < (a: GuestAddress, b: GuestAddress) -> Bool { a.rawValue < b.rawValue }
    public static func + (a: GuestAddress, offset: UInt64) -> GuestAddress { GuestAddress(a.rawValue + offset) }

    public var description: String { "0x" + String(rawValue, radix: 16) }
}
