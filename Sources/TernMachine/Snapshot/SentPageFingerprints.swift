import TernWire

/// What the receiver holds of each page, as a fingerprint of the bytes last
/// sent whole (0: unknown, or not sent whole), so that a page the dirty log
/// names but whose contents did not change is not sent again.
///
/// The dirty log says a page may have changed, not that it did. On this
/// kind of host (PVM, KVM's shadow MMU: no eager splitting of huge
/// mappings) the first write into a 2 MiB region backed by a huge page
/// drops the whole mapping, and the guest's next read of each of the
/// other 511 pages maps that page writable again, which KVM counts as a
/// write. A guest that reads its 256 MiB working set once a second left
/// 51.7K dirty pages after its first pass with huge pages at the source,
/// 21.7K of them unchanged, and 32.2K without (docs/MIGRATION.md, "Pages
/// that did not change", has the command). XBZRLE's cache finds such pages
/// too, but only those it holds; this costs 8 bytes a page and a hash at
/// about 20 GB/s (`tern-bench fingerprint`).
///
/// Shared by a migration's page streams: a page always travels on the same
/// stream, so each entry is only ever read and written by one stream's thread.
public final class SentPageFingerprints: @unchecked Sendable {
    // @unchecked Sendable: streams touch disjoint entries (StreamPartition); nothing else is mutable.
    private let table: UnsafeMutableBufferPointer<UInt64>

    public init(pageCount: Int) {
        table = .allocate(capacity: pageCount)
        table.initialize(repeating: 0)
    }

    deinit { table.deallocate() }

    /// The fingerprint of a page's bytes; never 0, which means "unknown".
    static func of(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        let value = Checksum.fingerprint(bytes)
        return value == 0 ? 1 : value
    }

    /// Whether the receiver holds exactly the bytes with this fingerprint.
    func holds(page: Int, fingerprint: UInt64) -> Bool { table[page] == fingerprint }

    /// Records what the receiver now holds: `fingerprint` for a page sent whole, 0 for anything else
    /// (a zero marker, an XBZRLE delta), which the next send must not take as unchanged.
    func record(page: Int, fingerprint: UInt64) { table[page] = fingerprint }
}
