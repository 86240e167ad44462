import TernWire

/// Flag on a `pages` frame answering a page request (the rest is background push).
public let demandReplyFlag: UInt32 = 1

/// What the destination needs after the switch: the source's pause time
/// (for downtime), an optional memory digest taken at the pause, and the
/// set of pages still to come. Pages outside the set are already correct at
/// the destination (sent in pre-copy and clean since) or zero.
public struct PostcopyStart: Equatable, Sendable {
    public var completion: Completion
    public var needed: PageSet

    public var encoded: [UInt8] {
        var w = WireWriter(capacity: needed.words.count * 8 + 64)
        w.writeBlob(completion.encoded)
        needed.write(to: &w)
        return w.bytes
    }

    public init(completion: Completion, needed: PageSet) {
        self.completion = completion
        self.needed = needed
    }

    public init(decoding bytes: [UInt8], pageCount: Int) throws(WireError) {
        var r = WireReader(bytes, context: "post-copy start")
        completion = try Completion(decoding: r.readBlob(maximum: 256))
        needed = try PageSet(reading: &r, pageCount: pageCount)
        try r.expectEnd()
    }
}

extension PageSet {
    /// As a page count and then the bitmap's words.
    func write(to w: inout WireWriter) {
        w.write(UInt64(pageCount))
        w.write(words: words)
    }

    init(reading r: inout WireReader, pageCount: Int) throws(WireError) {
        let count = try r.read(UInt64.self)
        guard count == UInt64(pageCount) else { throw .malformed("a bitmap of \(count) pages for a guest of \(pageCount)") }
        self.init(pageCount: pageCount)
        let words = try r.readWords(self.words.count)
        // Bits past the last page would make pages up.
        if pageCount % 64 != 0, let last = words.last, last >> UInt64(pageCount % 64) != 0 {
            throw .malformed("a bitmap with pages beyond the guest's \(pageCount)")
        }
        replaceWords(words)
    }
}

/// The opening of a post-copy resume: which migration the new connection continues.
public struct PostcopyResume: Equatable, Sendable {
    public var token: UInt64

    public init(token: UInt64) { self.token = token }

    public var encoded: [UInt8] {
        var w = WireWriter()
        w.write(Hello.magic)
        w.write(token)
        return w.bytes
    }

    public init(decoding bytes: [UInt8]) throws(WireError) {
        var r = WireReader(bytes, context: "post-copy resume")
        guard try r.readBytes(8) == Hello.magic else { throw .badMagic("the peer is not a Tern migration source") }
        token = try r.read()
        try r.expectEnd()
    }
}

/// The destination's answer to a resume: what it still waits for.
public struct PostcopyResumeReply: Equatable, Sendable {
    public var expected: PageSet

    public init(expected: PageSet) { self.expected = expected }

    public var encoded: [UInt8] {
        var w = WireWriter(capacity: expected.words.count * 8 + 16)
        expected.write(to: &w)
        return w.bytes
    }

    public init(decoding bytes: [UInt8], pageCount: Int) throws(WireError) {
        var r = WireReader(bytes, context: "post-copy resume reply")
        expected = try PageSet(reading: &r, pageCount: pageCount)
        try r.expectEnd()
    }
}

/// A list of page indices (memfd pages).
public struct PageRequest: Equatable, Sendable {
    public static let maximumPages = 4096
    public var pages: [UInt64]

    public init(pages: [UInt64]) { self.pages = pages }

    public var encoded: [UInt8] {
        var w = WireWriter(capacity: 4 + pages.count * 8)
        w.write(UInt32(pages.count))
        w.write(words: pages)
        return w.bytes
    }

    public init(decoding bytes: [UInt8]) throws(WireError) {
        var r = WireReader(bytes, context: "page request")
        let count = Int(try r.read(UInt32.self))
        guard count <= Self.maximumPages else { throw .tooLarge("page request for \(count) pages") }
        pages = try r.readWords(count)
        try r.expectEnd()
    }
}

/// The destination's account of the post-copy phase, reported by the source.
public struct PostcopyStatistics: Codable, Equatable, Sendable {
    public var faults: UInt64 = 0
    /// Requests sent to the source (faults on pages already requested are not counted again).
    public var requests: UInt64 = 0
    public var faultLatencyP50Ms: Double = 0
    public var faultLatencyP99Ms: Double = 0
    public var faultLatencyMaxMs: Double = 0
    public var pagesPushed: UInt64 = 0
    public var pagesPulled: UInt64 = 0
    /// Pages never written at the source, zero-filled locally on first touch.
    public var pagesZeroFilledLocally: UInt64 = 0
    /// From the destination starting the VM to it holding every page.
    public var memoryCompleteAfterMs: Double = 0
    public var memoryDigest: String?
    /// Times the source reconnected after post-copy's connection dropped (`tern migrate --resume`).
    public var reconnections: UInt64 = 0
    /// Second copies dropped: a requested page the source had already pushed was sent again on
    /// the demand channel, and whichever copy came second was not placed.
    public var secondCopiesDropped: UInt64 = 0

    public init() {}

    var encoded: [UInt8] {
        var w = WireWriter()
        for value in [faults, requests, pagesPushed, pagesPulled, pagesZeroFilledLocally, reconnections, secondCopiesDropped] { w.write(value) }
        for value in [faultLatencyP50Ms, faultLatencyP99Ms, faultLatencyMaxMs, memoryCompleteAfterMs] { w.write(value.bitPattern) }
        w.writeString(memoryDigest ?? "")
        return w.bytes
    }

    init(decoding bytes: [UInt8]) throws(WireError) {
        var r = WireReader(bytes, context: "post-copy statistics")
        faults = try r.read(); requests = try r.read(); pagesPushed = try r.read(); pagesPulled = try r.read()
        pagesZeroFilledLocally = try r.read()
        reconnections = try r.read()
        secondCopiesDropped = try r.read()
        faultLatencyP50Ms = Double(bitPattern: try r.read()); faultLatencyP99Ms = Double(bitPattern: try r.read())
        faultLatencyMaxMs = Double(bitPattern: try r.read()); memoryCompleteAfterMs = Double(bitPattern: try r.read())
        let digest = try r.readString(maximum: 64)
        memoryDigest = digest.isEmpty ? nil : digest
        try r.expectEnd()
    }
}
