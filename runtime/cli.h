/* cli.h (internal) — the `strata` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage or
 * configuration error. */
#ifndef STRATA_RUNTIME_CLI_H
#define STRATA_RUNTIME_CLI_H

int st_cli_main(int argc, char **argv);

#endif
