/// XBZRLE delta encoding of a page against an older copy of it (Svärd et
/// al., VEE 2011; the idea QEMU's xbzrle implements): a page re-sent in a
/// later pre-copy round usually differs from the copy the destination holds
/// in a few places, so only those places travel.
///
/// Encoding: a sequence of pairs
///     ULEB128 count of unchanged bytes, ULEB128 count of changed bytes, the changed bytes
/// The unchanged tail after the last pair is implicit. Both counts of a pair
/// may not be zero together, and a changed count may be zero only when the
/// pair ends exactly at the end of the page (it never needs to).
///
/// The encoder compares eight bytes at a time and only drops to bytes at the
/// edges of a change; it gives up (returns nil) as soon as the encoding
/// would reach `limit` bytes, so incompressible pages cost little.
public enum XBZRLE {
    public enum DecodeError: Error, Equatable, CustomStringConvertible {
        case overrun(offset: Int)
        case truncated
        case malformedCount
        case emptyPair

        public var description: String {
            switch self {
            case .overrun(let offset): "delta runs past the end of the page (at byte \(offset))"
            case .truncated: "delta ends inside a run"
            case .malformedCount: "delta has a malformed run length"
            case .emptyPair: "delta has an empty run pair"
            }
        }
    }

    /// Encodes `new` against `old` (same length) into `output`; returns the
    /// encoded length, or nil if it would not be shorter than `limit`.
    public static func encode(old: UnsafeRawBufferPointer, new: UnsafeRawBufferPointer,
                              into output: UnsafeMutableRawBufferPointer, limit: Int) -> Int? {
        precondition(old.count == new.count, "XBZRLE pages must have the same size")
        let length = new.count
        let capacity = min(limit, output.count)
        var out = 0
        var position = 0
        while position < length {
            // Unchanged run: whole words first.
            var unchangedEnd = position
            while unchangedEnd + 8 <= length,
                  old.loadUnaligned(fromByteOffset: unchangedEnd, as: UInt64.self) == new.loadUnaligned(fromByteOffset: unchangedEnd, as: UInt64.self) {
                unchangedEnd += 8
            }
            while unchangedEnd < length && old[unchangedEnd] == new[unchangedEnd] { unchangedEnd += 1 }
            if unchangedEnd == length { break } // the unchanged tail is implicit
            // Changed run: extend while bytes differ; a single equal byte does not end it
            // (a one-byte gap costs two bytes of counts, cheaper than splitting).
            var changedEnd = unchangedEnd
            while changedEnd < length {
                if changedEnd + 8 <= length {
                    let x = old.loadUnaligned(fromByteOffset: changedEnd, as: UInt64.self) ^ new.loadUnaligned(fromByteOffset: changedEnd, as: UInt64.self)
                    if allBytesDiffer(x) {
                        changedEnd += 8
                        continue
                    }
                }
                if old[changedEnd] != new[changedEnd] {
                    changedEnd += 1
                } else if changedEnd + 1 < length && old[changedEnd + 1] != new[changedEnd + 1] {
                    changedEnd += 2
                } else {
                    break
                }
            }
            let unchanged = unchangedEnd - position
            let changed = changedEnd - unchangedEnd
            guard out + uleb128Size(unchanged) + uleb128Size(changed) + changed < capacity else { return nil }
            out = writeULEB128(unchanged, into: output, at: out)
            out = writeULEB128(changed, into: output, at: out)
            UnsafeMutableRawBufferPointer(rebasing: output[out..<out + changed])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: new[unchangedEnd..<changedEnd]))
            out += changed
            position = changedEnd
        }
        return out
    }

    /// Applies a delta to `page` in place (it must hold the old contents).
    public static func decode(_ delta: UnsafeRawBufferPointer, into page: UnsafeMutableRawBufferPointer) throws(DecodeError) {
        var input = 0
        var position = 0
        while input < delta.count {
            let unchanged = try readULEB128(delta, at: &input)
            let changed = try readULEB128(delta, at: &input)
            guard unchanged > 0 || changed > 0 else { throw .emptyPair }
            guard unchanged <= page.count - position else { throw .overrun(offset: position) }
            position += unchanged
            guard changed <= page.count - position else { throw .overrun(offset: position) }
            guard changed <= delta.count - input else { throw .truncated }
            UnsafeMutableRawBufferPointer(rebasing: page[position..<position + changed])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: delta[input..<input + changed]))
            position += changed
            input += changed
        }
    }

    @inline(__always)
    static func allBytesDiffer(_ x: UInt64) -> Bool {
        // True when every byte of x is non-zero (classic "has zero byte" test, negated).
        ((x &- 0x0101_0101_0101_0101) & ~x & 0x8080_8080_8080_8080) == 0
    }

    @inline(__always)
    static func uleb128Size(_ value: Int) -> Int {
        value < 0x80 ? 1 : value < 0x4000 ? 2 : 3
    }

    @inline(__always)
    static func writeULEB128(_ value: Int, into output: UnsafeMutableRawBufferPointer, at offset: Int) -> Int {
        var value = value
        var offset = offset
        repeat {
            var byte = UInt8(value & 0x7F)
            value >>= 7
            if value != 0 { byte |= 0x80 }
            output[offset] = byte
            offset += 1
        } while value != 0
        return offset
    }

    /// Reads a ULEB128 count of at most three bytes (a page is at most 2^21 bytes).
    static func readULEB128(_ input: UnsafeRawBufferPointer, at offset: inout Int) throws(DecodeError) -> Int {
        var value = 0
        var shift = 0
        while true {
            guard offset < input.count else { throw .truncated }
            let byte = input[offset]
            offset += 1
            value |= Int(byte & 0x7F) << shift
            if byte & 0x80 == 0 { return value }
            shift += 7
            guard shift < 21 else { throw .malformedCount }
        }
    }
}
