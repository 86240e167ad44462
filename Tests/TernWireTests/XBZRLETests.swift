import Testing
@testable import TernWire

struct XBZRLETests {
    static let page = 4096

    func encode(_ old: [UInt8], _ new: [UInt8], limit: Int = 4096) -> [UInt8]? {
        var output = [UInt8](repeating: 0, count: 8192)
        let length = old.withUnsafeBytes { o in new.withUnsafeBytes { n in
            output.withUnsafeMutableBytes { XBZRLE.encode(old: o, new: n, into: $0, limit: limit) }
        } }
        return length.map { Array(output.prefix($0)) }
    }

    func decode(_ delta: [UInt8], onto old: [UInt8]) throws -> [UInt8] {
        var page = old
        try delta.withUnsafeBytes { d in try page.withUnsafeMutableBytes { try XBZRLE.decode(d, into: $0) } }
        return page
    }

    func randomPage(_ rng: inout some RandomNumberGenerator) -> [UInt8] {
        (0..<Self.page).map { _ in UInt8.random(in: 0...255, using: &rng) }
    }

    @Test func identicalPagesEncodeToNothing() throws {
        var rng = SystemRandomNumberGenerator()
        let page = randomPage(&rng)
        #expect(encode(page, page) == [])
        #expect(try decode([], onto: page) == page)
    }

    @Test func editsAtTheEdgesRoundTrip() throws {
        var rng = SystemRandomNumberGenerator()
        let old = randomPage(&rng)
        for positions in [[0], [4095], [0, 4095], [7, 8], [4088, 4089, 4090], Array(0..<64), Array(4032..<4096)] {
            var new = old
            for p in positions { new[p] &+= 1 }
            let delta = try #require(encode(old, new))
            #expect(delta.count < 200)
            #expect(try decode(delta, onto: old) == new, "positions \(positions)")
        }
    }

    @Test func randomEditsRoundTrip() throws {
        var rng = SystemRandomNumberGenerator()
        for trial in 0..<800 {
            let old = trial % 3 == 0 ? [UInt8](repeating: 0, count: Self.page) : randomPage(&rng)
            var new = old
            let edits = Int.random(in: 0...(trial % 10 == 0 ? 3000 : 40), using: &rng)
            for _ in 0..<edits {
                let start = Int.random(in: 0..<Self.page, using: &rng)
                let length = min(Int.random(in: 1...64, using: &rng), Self.page - start)
                for i in start..<start + length { new[i] = UInt8.random(in: 0...255, using: &rng) }
            }
            if let delta = encode(old, new) {
                #expect(delta.count < Self.page)
                #expect(try decode(delta, onto: old) == new, "trial \(trial)")
            } else {
                #expect(edits > 0, "only a page with changes can fail to compress")
            }
        }
    }

    @Test func incompressiblePagesGiveUpAtTheLimit() {
        var rng = SystemRandomNumberGenerator()
        let old = randomPage(&rng)
        let new = old.map { $0 ^ 0xFF }
        #expect(encode(old, new) == nil)
        // Every other byte changed: the gap rule makes it one run, still too big.
        var alternate = old
        for i in stride(from: 0, to: Self.page, by: 2) { alternate[i] ^= 1 }
        #expect(encode(old, alternate) == nil)
        // A small limit refuses a delta that would fit a page.
        var few = old
        for i in 0..<100 { few[i * 40] ^= 1 }
        #expect(encode(old, few, limit: 64) == nil)
        #expect(encode(old, few) != nil)
    }

    @Test func hostileDeltasAreRejected() {
        let old = [UInt8](repeating: 7, count: Self.page)
        let cases: [([UInt8], XBZRLE.DecodeError)] = [
            ([0x80, 0x20, 1, 0xAA], .overrun(offset: 4096)),       // skip 4096, then one more byte
            ([0xFF, 0xFF, 0x7F, 0], .overrun(offset: 0)),          // skip ~2 M
            ([0, 5, 1, 2], .truncated),                             // 5 changed bytes promised, 2 given
            ([0, 0], .emptyPair),
            ([0x80], .truncated),                                   // count continues past the end
            ([0x80, 0x80, 0x80, 0x01, 0], .malformedCount),         // a count longer than three bytes
            ([0x10], .truncated),                                   // a lone unchanged count
        ]
        for (delta, expected) in cases {
            #expect(throws: expected) { _ = try decode(delta, onto: old) }
        }
    }

    @Test func randomBytesNeverCrashTheDecoder() {
        var rng = SystemRandomNumberGenerator()
        let old = [UInt8](repeating: 1, count: Self.page)
        for _ in 0..<5000 {
            let delta = (0..<Int.random(in: 0...64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            _ = try? decode(delta, onto: old)
        }
    }
}
