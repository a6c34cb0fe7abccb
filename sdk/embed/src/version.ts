/** The SDK's version (`Firstmile.version`); equal to package.json's (a test checks). */
export const VERSION = "1.0.0";
