import ArgumentParser
import Foundation
import TernAPI
import TernMachine

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Pause a VM and write its state and memory to a file (resume it with `tern run --restore FILE`).")
    @OptionGroup var api: APIOptions

    @Option(help: "Snapshot file to write (replaced atomically).")
    var to: String

    @Flag(help: "Resume the VM after the snapshot instead of leaving it paused.")
    var resume = false

    func run() throws {
        let path = to.hasPrefix("/") ? to : FileManager.default.currentDirectoryPath + "/" + to
        let body = try APIJSON.encoder.encode(SnapshotRequest(path: path, resume: resume))
        let response: APIClient.Response
        do {
            response = try api.client.request(.PUT, "/v1/vm/snapshot", body: body, timeout: .minutes(30))
        } catch {
            fail("\(error)")
        }
        guard response.status == 200 else { fail(response.errorMessage ?? "the API answered \(response.status)") }
        if api.json {
            FileHandle.standardOutput.write(response.body)
            print()
            return
        }
        let stats = try APIJSON.decoder.decode(SnapshotStatistics.self, from: response.body)
        let megabytes = Double(stats.fileBytes) / 1e6
        print(String(format: "snapshot %@: %.1f MB (%llu data pages, %llu zero pages) in %.3f s (%.0f MB/s)",
                     path, megabytes, stats.dataPages, stats.zeroPages, stats.seconds, megabytes / max(stats.seconds, 1e-9)))
    }
}
