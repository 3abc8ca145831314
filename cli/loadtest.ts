// `ditpipe loadtest run <campaign.yaml>`: drives the public gRPC API with a campaign and writes
// JSON + HTML reports. Exit status: 0 all SLOs met, 2 an SLO missed, 130 the run was interrupted
// (Ctrl-C: reports are still written, SLOs not judged), 1 the campaign is invalid or the run could
// not start.
import { join } from 'node:path';
import { Command, Option } from 'commander';
import { CampaignError, loadCampaign } from '../loadtest/campaign.ts';
import { textSummary, writeReport } from '../loadtest/report.ts';
import { LoadtestError, runCampaign } from '../loadtest/runner.ts';
import { checkAddress } from '../shared/client.ts';
import { clientOptionsFromFlags } from './common.ts';

export const EXIT_SLO_MISSED = 2;
/** 128 + SIGINT, as a shell reports a command stopped with Ctrl-C. */
export const EXIT_INTERRUPTED = 130;

const run = new Command('run')
  .description('run a load-testing campaign (YAML) against a ditpipe scheduler and write JSON + HTML reports')
  .argument('<campaign.yaml>', 'campaign file (see docs/loadtest.md)')
  .option('--out <dir>', 'directory for the reports (<name>-<time>.json/.html)', 'loadtest-results')
  .option('--json <file>', 'JSON report path (overrides --out)')
  .option('--html <file>', 'HTML report path (overrides --out)')
  .option('--target <host:port>', 'override the campaign target address')
  .addOption(new Option('--allow-remote', 'allow targets and metrics endpoints other than loopback and target.allowHosts').default(false))
  .addOption(
    new Option(
      '--token-file <file>',
      'file holding the bearer token to send (DITPIPE_TOKEN may hold the token itself; overrides target.tokenFile)',
    ).env('DITPIPE_TOKEN_FILE'),
  )
  .option('--no-status', 'no live status line on stderr')
  .action(
    async (
      file: string,
      o: { out: string; json?: string; html?: string; target?: string; allowRemote: boolean; status: boolean; tokenFile?: string },
    ) => {
      let campaign;
      try {
        campaign = loadCampaign(file);
        if (o.target) {
          try {
            campaign.target.address = checkAddress(o.target, '--target');
          } catch (err) {
            throw new CampaignError((err as Error).message);
          }
        }
      } catch (err) {
        if (err instanceof CampaignError) {
          console.error(err.message);
          process.exit(1);
        }
        throw err;
      }
      const ac = new AbortController();
      const onSignal = (): void => {
        process.stderr.write('\nstopping: cancelling in-flight requests (Ctrl-C again to quit now)\n');
        ac.abort();
        process.once('SIGINT', () => process.exit(130));
      };
      process.once('SIGINT', onSignal);
      let report;
      try {
        const { token } = clientOptionsFromFlags({ tokenFile: o.tokenFile });
        report = await runCampaign(campaign, {
          allowRemote: o.allowRemote,
          file,
          status: o.status ? process.stderr : null,
          signal: ac.signal,
          token,
        });
      } catch (err) {
        if (err instanceof LoadtestError) {
          console.error(`ditpipe loadtest: ${err.message}`);
          process.exit(1);
        }
        throw err;
      } finally {
        process.off('SIGINT', onSignal);
      }
      const stamp = new Date().toISOString().replace(/[:.]/g, '-');
      const base = join(o.out, `${campaign.name.replace(/[^A-Za-z0-9_.-]/g, '_')}-${stamp}`);
      const paths = { json: o.json ?? `${base}.json`, html: o.html ?? `${base}.html` };
      writeReport(report, paths);
      console.log(textSummary(report));
      console.log(`report: ${paths.json}\nhtml:   ${paths.html}`);
      if (report.outcome === 'interrupted') process.exitCode = EXIT_INTERRUPTED;
      else if (report.outcome === 'missed') process.exitCode = EXIT_SLO_MISSED;
    },
  );

export const command = new Command('loadtest').description('load-testing campaigns against the Sampler API').addCommand(run);
