/// A size in bytes as people write it on command lines: `512M`, `2G`, `16MiB`,
/// `1048576`. Suffixes are binary (K = 1024), as QEMU and Cloud Hypervisor read them.
public struct ByteSize: Equatable, Hashable, Sendable, CustomStringConvertible {
    public let bytes: UInt64

    public init(bytes: UInt64) { self.bytes = bytes }

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case empty
        case malformed(String)
        case overflow(String)

        public var description: String {
            switch self {
            case .empty: "empty size"
            case .malformed(let text): "malformed size '\(text)' (expected a number with an optional K, M, G or T suffix, e.g. 512M)"
            case .overflow(let text): "size '\(text)' is too large"
            }
        }
    }

    public init(parsing text: String) throws(ParseError) {
        let trimmed = text.trimmingWhitespace()
        guard !trimmed.isEmpty else { throw .empty }
        let digits = trimmed.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, let number = UInt64(digits) else { throw .malformed(text) }
        let suffix = trimmed.dropFirst(digits.count).lowercased()
        let shift: UInt64
        switch suffix {
        case "", "b": shift = 0
        case "k", "kb", "kib": shift = 10
        case "m", "mb", "mib": shift = 20
        case "g", "gb", "gib": shift = 30
        case "t", "tb", "tib": shift = 40
        default: throw .malformed(text)
        }
        let (value, overflow) = number.multipliedReportingOverflow(by: 1 << shift)
        guard !overflow else { throw .overflow(text) }
        bytes = value
    }

    public static func mebibytes(_ n: UInt64) -> ByteSize { ByteSize(bytes: n << 20) }
    public static func gibibytes(_ n: UInt64) -> ByteSize { ByteSize(bytes: n << 30) }

    /// The shortest exact form: 1G rather than 1024M.
    public var description: String {
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] where bytes != 0 && bytes % (1 << UInt64(shift)) == 0 {
            return "\(bytes >> UInt64(shift))\(unit)"
        }
        return "\(bytes)"
    }
}

extension String {
    func trimmingWhitespace() -> String {
        var scalars = Substring(self)
        while let first = scalars.first, first.isWhitespace { scalars.removeFirst() }
        while let last = scalars.last, last.isWhitespace { scalars.removeLast() }
        return String(scalars)
    }
}

/// A rate in bytes per second as command lines give it: `100000000` or `100M`. Suffixes
/// are decimal (K = 1000), as network rates are; nil for anything else, zero included.
public enum ByteRate {
    public static func parse(_ text: String) -> UInt64? {
        let multipliers: [Character: UInt64] = ["K": 1_000, "M": 1_000_000, "G": 1_000_000_000]
        var digits = Substring(text)
        var multiplier: UInt64 = 1
        if let last = digits.last?.uppercased().first, let m = multipliers[last] { multiplier = m; digits = digits.dropLast() }
        guard let value = UInt64(digits), value > 0 else { return nil }
        let (product, overflow) = value.multipliedReportingOverflow(by: multiplier)
        return overflow ? nil : product
    }
}
