/// A device as the user asked for it on `tern run` (`--disk`, `--net`): what
/// the machine builds, what a snapshot and a migration record, and what a
/// restore or a destination must match.
public enum DeviceSpec: Equatable, Sendable {
    case disk(DiskSpec)
    case network(NetworkSpec)

    public var id: String {
        switch self {
        case .disk(let disk): disk.id
        case .network(let network): network.id
        }
    }
}

/// `--disk path=FILE[,readonly=on][,id=NAME]`.
public struct DiskSpec: Equatable, Sendable {
    public var id: String
    public var path: String
    public var readOnly: Bool

    public init(id: String, path: String, readOnly: Bool = false) {
        self.id = id
        self.path = path
        self.readOnly = readOnly
    }

    /// Parses the option's value; `index` names an unnamed disk (`disk0`, `disk1`, ...).
    public init(parsing text: String, index: Int) throws(DeviceSpecError) {
        let options = try OptionList(text, option: "--disk", known: ["path", "readonly", "id"])
        guard let path = options["path"], !path.isEmpty else { throw .missing("--disk", "path") }
        self.init(id: try options.id(default: "disk\(index)"), path: path, readOnly: try options.flag("readonly"))
    }
}

/// `--net tap=NAME[,mac=MAC][,id=NAME]`.
public struct NetworkSpec: Equatable, Sendable {
    public var id: String
    public var tap: String
    public var mac: MACAddress

    public init(id: String, tap: String, mac: MACAddress) {
        self.id = id
        self.tap = tap
        self.mac = mac
    }

    /// Without `mac=`, a locally administered address derived from the id and TAP name, so the
    /// same command line gives the same MAC (it then travels with the VM in its state).
    public init(parsing text: String, index: Int) throws(DeviceSpecError) {
        let options = try OptionList(text, option: "--net", known: ["tap", "mac", "id"])
        guard let tap = options["tap"], !tap.isEmpty else { throw .missing("--net", "tap") }
        guard tap.utf8.count < 16 else { throw .badValue("--net", "tap", tap, "interface names are at most 15 bytes") }
        let id = try options.id(default: "net\(index)")
        let mac: MACAddress
        if let text = options["mac"] {
            guard let parsed = MACAddress(text) else { throw .badValue("--net", "mac", text, "expected six hex bytes as 52:54:00:12:34:56") }
            guard parsed.bytes[0] & 1 == 0 else { throw .badValue("--net", "mac", text, "a multicast address cannot be a NIC's") }
            mac = parsed
        } else {
            mac = MACAddress(derivedFrom: id + "/" + tap)
        }
        self.init(id: id, tap: tap, mac: mac)
    }
}

public struct MACAddress: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var bytes: [UInt8]

    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var bytes: [UInt8] = []
        for part in parts {
            guard part.count == 2, let byte = UInt8(part, radix: 16) else { return nil }
            bytes.append(byte)
        }
        self.bytes = bytes
    }

    public init(bytes: [UInt8]) { self.bytes = Array(bytes.prefix(6)) + [UInt8](repeating: 0, count: max(0, 6 - bytes.count)) }

    /// 52:54:00 (QEMU's locally administered prefix) and three bytes of an FNV-1a hash of `seed`.
    init(derivedFrom seed: String) {
        var hash: UInt32 = 2_166_136_261
        for byte in seed.utf8 { hash = (hash ^ UInt32(byte)) &* 16_777_619 }
        self.init(bytes: [0x52, 0x54, 0x00, UInt8(truncatingIfNeeded: hash >> 16), UInt8(truncatingIfNeeded: hash >> 8), UInt8(truncatingIfNeeded: hash)])
    }

    public var description: String { bytes.map { String($0, radix: 16).leftPadded(to: 2) }.joined(separator: ":") }
}

private extension String {
    func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}

public enum DeviceSpecError: Error, Equatable, CustomStringConvertible {
    case malformed(String, String)
    case unknownKey(String, String)
    case repeatedKey(String, String)
    case missing(String, String)
    case badValue(String, String, String, String)
    case duplicateID(String)
    case tooMany(Int)

    public var description: String {
        switch self {
        case .malformed(let option, let part): "\(option): '\(part)' is not key=value"
        case .unknownKey(let option, let key): "\(option): unknown key '\(key)'"
        case .repeatedKey(let option, let key): "\(option): '\(key)' given twice"
        case .missing(let option, let key): "\(option): \(key)= is required"
        case .badValue(let option, let key, let value, let why): "\(option): \(key)=\(value): \(why)"
        case .duplicateID(let id): "two devices have the id '\(id)'"
        case .tooMany(let limit): "at most \(limit) devices"
        }
    }
}

/// `key=value,key=value`, as QEMU and Cloud Hypervisor write device options.
struct OptionList {
    let option: String
    private var values: [String: String] = [:]

    init(_ text: String, option: String, known: Set<String>) throws(DeviceSpecError) {
        self.option = option
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            guard let equals = part.firstIndex(of: "=") else { throw .malformed(option, String(part)) }
            let key = String(part[..<equals]), value = String(part[part.index(after: equals)...])
            guard known.contains(key) else { throw .unknownKey(option, key) }
            guard values[key] == nil else { throw .repeatedKey(option, key) }
            values[key] = value
        }
    }

    subscript(key: String) -> String? { values[key] }

    func flag(_ key: String) throws(DeviceSpecError) -> Bool {
        switch values[key] {
        case nil, "off", "false": false
        case "on", "true": true
        case let other?: throw .badValue(option, key, other, "expected on or off")
        }
    }

    func id(default fallback: String) throws(DeviceSpecError) -> String {
        guard let id = values["id"] else { return fallback }
        guard !id.isEmpty, id.utf8.count <= 32, id.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) else {
            throw .badValue(option, "id", id, "1 to 32 letters, digits, - or _")
        }
        return id
    }
}

extension [DeviceSpec] {
    /// Every id unique, and no more than the MMIO window holds.
    public func validate() throws(DeviceSpecError) {
        var seen = Set<String>()
        for spec in self {
            guard seen.insert(spec.id).inserted else { throw .duplicateID(spec.id) }
        }
        guard count <= MmioWindow.deviceLimit else { throw .tooMany(MmioWindow.deviceLimit) }
    }
}
