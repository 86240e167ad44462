import Synchronization
import TernDevices

/// Pages of guest RAM that devices wrote from their own threads (through the
/// VMM's mapping, which KVM's dirty log does not see), by memfd page index,
/// as the migration's dirty-page sets count them. A migration takes and
/// clears it with every read of KVM's log, so a page a device wrote after it
/// was copied is copied again.
public final class DeviceWriteLog: Sendable {
    private let words: Mutex<[UInt64]>
    public let pageCount: Int

    init(pageCount: Int) {
        self.pageCount = pageCount
        words = Mutex([UInt64](repeating: 0, count: (pageCount + 63) / 64))
    }

    func mark(firstPage: Int, count: Int) {
        guard count > 0, firstPage >= 0, firstPage + count <= pageCount else { return }
        words.withLock { words in
            for page in firstPage..<firstPage + count { words[page / 64] |= 1 << UInt64(page % 64) }
        }
    }

    /// The pages marked since the last call, as bitmap words (bit i of word w: page 64·w + i); clears them.
    public func take() -> [UInt64] {
        words.withLock { words in
            let taken = words
            for i in words.indices { words[i] = 0 }
            return taken
        }
    }
}

extension GuestMemory: GuestRAM {
    public func bytes(at address: UInt64, count: Int) -> UnsafeMutableRawPointer? {
        guard count >= 0, let pointer = try? hostPointer(GuestAddress(address), length: UInt64(max(count, 1))) else { return nil }
        return pointer
    }

    public func noteDeviceWrite(at address: UInt64, count: Int) {
        guard count > 0, let offset = try? fileOffset(of: GuestAddress(address), length: UInt64(count)) else { return }
        let first = Int(offset / Self.pageSize), last = Int((offset + UInt64(count) - 1) / Self.pageSize)
        deviceWrites.mark(firstPage: first, count: last - first + 1)
    }
}
