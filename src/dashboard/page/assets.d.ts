// Style sheets the bundler (esbuild) collects into app.css.
declare module '*.css';
