/* main.c — the strata binary: everything lives in libstrata; this only hands over argv. */
#include "cli.h"

int main(int argc, char **argv) { return st_cli_main(argc, argv); }
